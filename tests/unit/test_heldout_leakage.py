"""No held-out entity, subject, template, question text or fact can reach a training set.

Checked against the real knowledge bases: the full ``build_dataset()`` (every training
topic, real and invented, in the wording each question was given) and every wording of
every training topic, against every held-out topic and long-form subject. A *fact* leaks
when a training question names a held-out subject (outside its own subject) and carries
one of that subject's held-out values among its answers ("GHS" -> "Ghana cedi" would
tell training a held-out country's currency). Whole domains are held out too
(``heldout.HELDOUT_ONLY_DOMAINS``: time zones, units): no training topic or question may
belong to one, use its entity kind, or answer with an IANA zone identifier.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from zoneinfo import available_timezones

import pytest

from probes.datasets import countries as countries_mod
from probes.datasets import currencies, heldout
from probes.datasets.countries import ascii_fold
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.registry import TOPICS, build_dataset
from probes.datasets.schema import Question
from probes.labeling import contains_words, normalize


def _fold(text: str) -> str:
    return ascii_fold(text).casefold().strip()


def _template(q: Question) -> str:
    return _fold(q.question.replace(q.subject, "{}"))


def heldout_facts(held: Sequence[Question], longform: Sequence[heldout.LongformSubject]
                  ) -> dict[str, set[str]]:
    """Held-out subject (folded) -> its held-out values (normalised)."""
    out: dict[str, set[str]] = {}
    for q in held:
        if not q.invented:
            out.setdefault(_fold(q.subject), set()).update(normalize(a) for a in q.answers)
    for s in longform:
        if not s.invented:
            out.setdefault(_fold(s.name), set()).update(
                normalize(v) for vals in s.values.values() for v in vals)
    return {k: {v for v in vals if v} for k, vals in out.items() if k}


def leaked_facts(training: Sequence[Question], facts: dict[str, set[str]]) -> list[str]:
    """``question id: subject -> value`` for every training question that names a held-out
    subject (besides its own subject) and has one of that subject's values as an answer."""
    names = sorted(facts, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b")
    # Longer names of open countries that contain a held-out one ("Democratic Republic of
    # the Congo" holds "Republic of the Congo") are blanked out first: they name another
    # country.
    longer = sorted({f for c in countries_mod.countries().values()
                     if not is_heldout_entity(f"country:{c.iso}")
                     for f in map(_fold, c.names)
                     if f not in facts and pattern.search(f)}, key=len, reverse=True)
    shadow = re.compile(r"\b(" + "|".join(re.escape(n) for n in longer) + r")\b") \
        if longer else None
    out = []
    for q in training:
        text = _fold(" ".join([q.question.replace(q.subject, " "), *q.answers]))
        text = shadow.sub(" ", text) if shadow else text
        answers = [normalize(a) for a in q.answers]
        for name in set(pattern.findall(text)):
            for value in facts[name]:
                if any(contains_words(a, value) for a in answers):
                    out.append(f"{q.id}: {name} -> {value}")
    return out


def _longform() -> list[heldout.LongformSubject]:
    """Every long-form subject: countries and (held-out-only domain) cities."""
    return heldout.longform_subjects() + heldout.longform_city_subjects()


def heldout_domain_leaks(training: Sequence[Question]) -> list[str]:
    """``question id: why`` for every training question of a held-out-only domain: its
    domain, its entity's kind, or an answer that is an IANA zone identifier ("Asia/Kolkata",
    links included), whatever topic it was filed under."""
    kinds = set(heldout.HELDOUT_ONLY_DOMAINS.values())
    zones = {normalize(z) for z in available_timezones() if "/" in z}
    out = []
    for q in training:
        if q.domain in heldout.HELDOUT_ONLY_DOMAINS:
            out.append(f"{q.id}: domain {q.domain}")
        if q.entity.partition(":")[0] in kinds:
            out.append(f"{q.id}: entity {q.entity}")
        out += [f"{q.id}: answer {a!r} is a time zone" for a in q.answers
                if normalize(a) in zones]
    return out


@pytest.fixture(scope="module")
def training() -> list[Question]:
    return build_dataset()


@pytest.fixture(scope="module")
def held() -> list[Question]:
    return heldout.build_heldout()


def test_no_heldout_entity_reaches_training(training: list[Question],
                                            held: list[Question]) -> None:
    assert not [q.id for q in training if is_heldout_entity(q.entity)]
    train_entities = {q.entity for q in training}
    leaked = sorted({q.entity for q in held} & train_entities)
    assert not leaked, leaked
    longform = {s.entity for s in _longform()}
    assert not sorted(longform & train_entities)


def test_no_heldout_subject_question_or_template_reaches_training(
        training: list[Question], held: list[Question]) -> None:
    train_subjects = {_fold(q.subject) for q in training}
    train_questions = {_fold(q.question) for q in training}
    train_templates = {_template(q) for q in training}
    train_shots = {_fold(s.question) for q in training for s in q.shots}
    for q in held:
        assert _fold(q.subject) not in train_subjects, q.id
        assert _fold(q.question) not in train_questions | train_shots, q.id
        assert _template(q) not in train_templates, q.id
        for shot in q.shots:  # the held-out wording is new even in its examples
            assert _fold(shot.question) not in train_questions | train_shots, q.id
    for s in _longform():
        if s.invented:
            assert _fold(s.name) not in train_subjects, s.name
    # no training question mentions a held-out invented subject anywhere in its text
    invented = {_fold(q.subject) for q in held if q.invented}
    invented |= {_fold(s.name) for s in _longform() if s.invented}
    text = " ".join(_fold(q.question) for q in training)
    assert not [n for n in invented if re.search(rf"\b{re.escape(n)}\b", text)]


def test_heldout_topics_have_questions_of_both_kinds(held: list[Question]) -> None:
    by_topic: dict[str, list[Question]] = {}
    for q in held:
        by_topic.setdefault(q.topic, []).append(q)
    assert set(by_topic) == set(heldout.TOPICS)
    for topic, qs in by_topic.items():
        assert len(qs) >= 15, (topic, len(qs))
        assert all(q.invented == topic.endswith("_invented") for q in qs)
        assert all(is_heldout_entity(q.entity) for q in qs), topic
    assert len({q.id for q in held}) == len(held)


def test_heldout_selection_is_stable_and_spares_few_shot_entities() -> None:
    assert is_heldout_entity("country:DE") == is_heldout_entity("country:DE")
    for iso in ("FR", "JP", "KE", "MX", "SE", "BR"):
        assert not is_heldout_entity(f"country:{iso}")
    share = sum(is_heldout_entity(f"element:{n}") for n in range(1, 119)) / 118
    assert 0.1 < share < 0.3
    assert not is_heldout_entity("topic:anything") and not is_heldout_entity("country:")
    subjects = heldout.longform_subjects()
    assert sum(s.invented for s in subjects) == 30 and sum(not s.invented for s in subjects) >= 20
    assert all(s.values["capital"] for s in subjects if not s.invented)


@pytest.fixture(scope="module")
def facts(held: list[Question]) -> dict[str, set[str]]:
    return heldout_facts(held, _longform())


def test_no_training_wording_is_a_heldout_wording(held: list[Question]) -> None:
    """Every wording of every training topic, not only those a seed happened to pick."""
    wordings = {_fold(p.replace("{name}", "{}")) for t in TOPICS.values() for p in t.phrasings}
    for q in held:
        assert _template(q) not in wordings, q.id
    assert _fold(heldout.LONGFORM_PROMPT.replace("{name}", "{}")) not in wordings


def test_no_heldout_fact_reaches_training(training: list[Question],
                                          facts: dict[str, set[str]]) -> None:
    assert len(facts) > 100
    assert not leaked_facts(training, facts)


def test_the_fact_check_catches_a_leak(held: list[Question], facts: dict[str, set[str]],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The check fails on a held-out fact asked under a training topic, and on the
    currency builder without its held-out filter (held-out countries' names then qualify
    their currencies' names)."""
    fact = next(q for q in held if q.topic == "heldout_calling_code")
    leak = Question(id="country_capital:leak", topic="country_capital", domain="geography",
                    entity="country:ZZ", subject="Wakanda",
                    question=f"Which number do you dial to call {fact.subject}?",
                    answers=fact.answers)
    assert leaked_facts([leak], facts)
    monkeypatch.setattr(currencies, "is_heldout_entity", lambda entity: False)
    currencies.currencies.cache_clear()
    try:
        unfiltered = currencies.build_currency_from_code()
    finally:
        currencies.currencies.cache_clear()
    assert leaked_facts(unfiltered, facts)


def test_no_heldout_only_domain_reaches_training(training: list[Question]) -> None:
    assert not [t.name for t in TOPICS.values() if t.domain in heldout.HELDOUT_ONLY_DOMAINS]
    assert not heldout_domain_leaks(training)
    # and the held-out set does ask about them, with facts the fact check knows
    held_domains = {heldout.domain_of(t) for t in heldout.TOPICS}
    assert set(heldout.HELDOUT_ONLY_DOMAINS) <= held_domains


def test_the_domain_and_fact_checks_catch_a_planted_leak(
        held: list[Question], facts: dict[str, set[str]]) -> None:
    """A held-out-only domain's question, entity or zone answer filed under a training
    topic is caught, and so is any new-domain fact asked in a training wording."""
    def planted(**kw: object) -> Question:
        base = {"id": "country_capital:leak", "topic": "country_capital",
                "domain": "geography", "entity": "country:ZZ", "subject": "Wakanda",
                "question": "What is the capital of Wakanda?", "answers": ["Birnin Zana"]}
        return Question.model_validate({**base, **kw})

    assert not heldout_domain_leaks([planted()])
    assert heldout_domain_leaks([planted(domain="time_zones")])
    assert heldout_domain_leaks([planted(entity="unit:newton")])
    assert heldout_domain_leaks([planted(answers=["Asia/Calcutta"])])  # a link name too
    for topic in ("heldout_city_timezone", "heldout_city_utc_offset", "heldout_unit_symbol",
                  "heldout_unit_quantity"):
        fact = next(q for q in held if q.topic == topic)
        leak = planted(id=f"city_country:{topic}", topic="city_country",
                       question=f"Unlike Wakanda, what does {fact.subject} have?",
                       answers=fact.answers[:1])
        assert leaked_facts([leak], facts), topic
