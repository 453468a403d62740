"""The breadth topics (issue 22): real package data, aliases, phrasings, invented twins."""

from __future__ import annotations

from collections import Counter

import pytest

from probes.datasets import (
    airports,
    country_facts,
    currencies,
    invented,
    languages,
    national_days,
)
from probes.datasets.phrasing import MIN_PHRASINGS, rephrase, slot_of
from probes.datasets.registry import (
    BREADTH_TOPICS,
    CORE_TOPICS,
    TOPICS,
    build_dataset,
    resolve_topics,
)
from probes.datasets.schema import Question
from probes.labeling import label_answer


def _by_subject(questions: list[Question]) -> dict[str, Question]:
    return {q.subject: q for q in questions}


def _label(q: Question, answer: str) -> str:
    return label_answer(q, answer).label


def test_breadth_has_24_real_topics_in_8_domains_each_with_a_twin() -> None:
    real = [n for n in BREADTH_TOPICS if not TOPICS[n].invented]
    assert len(real) >= 24
    assert len({TOPICS[n].domain for n in real}) >= 8
    twins = {invented.TEMPLATES[n][1] for n in BREADTH_TOPICS if TOPICS[n].invented}
    new = [n for n in real if n not in CORE_TOPICS]
    assert set(new) <= twins, set(new) - twins
    for name in twins:  # a twin sits in its real topic's domain and uses its wordings
        twin = TOPICS[f"invented_{name}"]
        assert twin.domain == TOPICS[name].domain and twin.phrasings == TOPICS[name].phrasings


def test_every_topic_has_three_wordings_its_questions_and_shots_follow() -> None:
    for name, topic in TOPICS.items():
        assert len(set(topic.phrasings)) >= MIN_PHRASINGS, name
        if topic.invented:
            assert invented.TEMPLATES[name][2] == topic.phrasings[0], name
            continue
        for q in topic.build()[:20]:
            slot_of(topic.phrasings[0], q.question)
            for shot in q.shots:
                slot_of(topic.phrasings[0], shot.question)


def test_rephrasing_is_seeded_covers_every_wording_and_keeps_the_entity() -> None:
    a = build_dataset(["country_capital", "language_code"], limit_per_topic=40, seed=0)
    b = build_dataset(["country_capital", "language_code"], limit_per_topic=40, seed=0)
    c = build_dataset(["country_capital", "language_code"], limit_per_topic=40, seed=1)
    assert a == b
    assert [q.phrasing for q in a] != [q.phrasing for q in c]
    for topic in ("country_capital", "language_code"):
        used = Counter(q.phrasing for q in a if q.topic == topic)
        assert set(used) == set(range(len(TOPICS[topic].phrasings))), used
    q = next(x for x in a if x.topic == "country_capital" and x.phrasing)
    assert q.question == TOPICS["country_capital"].phrasings[q.phrasing].format(name=q.subject)
    for shot in q.shots:  # the examples are worded like the question
        slot_of(TOPICS["country_capital"].phrasings[q.phrasing], shot.question)
    original = _by_subject(TOPICS["country_capital"].build())[q.subject]
    assert (q.id, q.entity, q.answers) == (original.id, original.entity, original.answers)
    with pytest.raises(ValueError, match="is not worded as"):
        rephrase(original.model_copy(update={"question": "Capital of Peru?"}),
                 TOPICS["country_capital"].phrasings)


def test_selections_expand_and_unknown_names_fail() -> None:
    assert resolve_topics(["core"]) == [n for n in TOPICS if n in resolve_topics(["core"])]
    assert "language_code" not in resolve_topics(["core"])
    assert set(resolve_topics(["breadth"])) == set(TOPICS)
    assert resolve_topics(["core", "country_capital"]) == resolve_topics(["core"])
    with pytest.raises(ValueError, match="selections: breadth"):
        resolve_topics(["nope"])


def test_languages() -> None:
    code = _by_subject(languages.build_language_code())
    assert code["Italian"].answers == ["it"] and code["Italian"].answer_type == "symbol"
    assert _label(code["Italian"], " it") == "retrieval"
    assert _label(code["Italian"], " ita") == "fabrication"
    from_code = _by_subject(languages.build_language_from_code())
    assert _label(from_code["it"], " Italian") == "retrieval"
    assert _label(from_code["el"] if "el" in from_code else from_code["nl"], " Klingon") == \
        "fabrication"
    script = _by_subject(languages.build_language_script())
    assert script["Ukrainian"].answers == ["Cyrillic"]
    assert _label(script["Hindi"], " Devanagari script") == "retrieval"
    assert _label(script["Italian"], " The Roman alphabet") == "retrieval"  # alias
    assert "Chinese" not in script  # a composite script has no one-word answer
    assert "Thai" not in script and "Greek" not in script  # the answer would copy the name
    assert "Avestan" not in code and "Kuanyama" not in code  # under a million speakers
    autonym = _by_subject(languages.build_language_autonym())
    assert _label(autonym["Italian"], " italiano") == "retrieval"
    assert "Russian" not in autonym  # not in Latin letters
    assert "French" not in code  # a few-shot example


def test_currencies() -> None:
    code = _by_subject(currencies.build_currency_code())
    assert _label(code["Swiss Franc"], " CHF") == "retrieval"
    assert _label(code["Swiss Franc"], " SFR") == "fabrication"
    from_code = _by_subject(currencies.build_currency_from_code())
    assert _label(from_code["CHF"], " Swiss franc") == "retrieval"
    assert _label(from_code["CHF"], " Franc") == "ambiguous"  # shared by many francs
    assert _label(from_code["CHF"], " Euro") == "fabrication"
    assert _label(from_code["NGN"], " Nigerian naira") == "retrieval"
    assert _label(from_code["NGN"], " Naira") == "retrieval"  # a unit no other shares
    assert "JPY" not in from_code  # a few-shot example


def test_airports() -> None:
    iata = {q.id.split(":")[1]: q for q in airports.build_airport_iata()}
    assert _label(iata["ORD"], " ORD") == "retrieval" and iata["ORD"].answer_type == "symbol"
    assert _label(iata["ORD"], " MDW") == "fabrication"
    icao = {q.id.split(":")[1]: q for q in airports.build_airport_icao()}
    assert icao.keys() == iata.keys()
    city = _by_subject(airports.build_airport_city())
    assert _label(city["ORD"], " Chicago") == "retrieval"
    assert _label(city["ORD"], " Chicago, Illinois") == "retrieval"
    assert _label(city["ORD"], " Detroit") == "fabrication"
    icao_ord = {q.id.split(":")[1]: q for q in airports.build_airport_icao()}["ORD"]
    assert icao_ord.answers == ["KORD"] and icao_ord.subject == iata["ORD"].subject
    assert {q.entity for q in city.values()} == {q.entity for q in iata.values()}
    assert "CDG" not in city and len(city) >= 100


def test_national_days() -> None:
    ind = _by_subject(national_days.build_independence_day())
    assert _label(ind["Ghana"], " March 6, 1957") == "retrieval"
    assert _label(ind["Ghana"], " 6th of March") == "retrieval"
    assert _label(ind["Ghana"], " March 16") == "fabrication"
    assert _label(ind["Ghana"], " March") == "ambiguous"  # part of the answer
    nat = _by_subject(national_days.build_national_day())
    assert _label(nat["Belgium"], " 21 July") == "retrieval"
    assert "Mexico" not in ind and "France" not in nat  # few-shot examples


def test_country_codes_and_names() -> None:
    a2 = _by_subject(country_facts.build_country_alpha2())
    assert _label(a2["Germany"], " DE") == "retrieval" and _label(a2["Germany"], " GE") != \
        "retrieval"
    a3 = _by_subject(country_facts.build_country_alpha3())
    assert a3["Germany"].answers == ["DEU"]
    tld = _by_subject(country_facts.build_country_tld())
    assert _label(tld["Germany"], " .de") == "retrieval"
    dem = _by_subject(country_facts.build_country_demonym())
    assert _label(dem["Germany"], " Germans") == "retrieval"
    assert _label(dem["Germany"], " Austrians") == "fabrication"
    es = _by_subject(country_facts.build_country_spanish_name())
    assert _label(es["Germany"], " Alemania") == "retrieval"
    de = _by_subject(country_facts.build_country_german_name())
    assert _label(de["Italy"], " Italien") == "retrieval"
    native = _by_subject(country_facts.build_country_native_name())
    assert _label(native["Germany"], " Deutschland") == "retrieval"
    assert "Japan" not in native  # 日本 is not in Latin letters
    assert "Kenya" not in es  # the same as in English: a copy task, not a fact


def test_invented_twins_have_no_answers_and_name_nothing_real() -> None:
    names = [n for n in TOPICS if TOPICS[n].invented]
    made = invented.build_invented(per_template=8, seed=5, templates=names)
    assert Counter(q.topic for q in made) == {n: 8 for n in names}
    real_codes = {"invented_language_from_code": languages.known_codes(),
                  "invented_currency_from_code": currencies.known_codes(),
                  "invented_airport_city": airports.known_codes()}
    for q in made:
        assert q.invented and not q.answers and q.entity.startswith("invented:")
        if q.answer_type != "claims":
            assert _label(q, " Paris") == "fabrication"
        assert q.subject.casefold() not in real_codes.get(q.topic, ()), q.subject
    assert len({q.entity for q in made}) == len(made)
