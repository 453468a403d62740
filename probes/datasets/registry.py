"""Every dataset builder by topic name, and the question JSONL files they produce."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from probes.datasets import (
    airports,
    countries,
    country_facts,
    currencies,
    elements,
    invented,
    languages,
    longform,
    national_days,
    us_states,
)
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.phrasing import rephrase
from probes.datasets.schema import Question

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topic:
    name: str
    domain: str
    description: str
    build: Callable[[], list[Question]]
    invented: bool = False
    # Wordings of the question (probes.datasets.phrasing); the builder writes the first.
    phrasings: tuple[str, ...] = ()


_MODULES = (countries, elements, us_states, languages, currencies, airports, national_days,
            country_facts, longform)


def phrasings_of(topic: str) -> tuple[str, ...]:
    """The wordings of a real topic (an invented twin uses its real topic's)."""
    for module in _MODULES:
        if topic in module.PHRASINGS:
            return tuple(module.PHRASINGS[topic])
    raise KeyError(f"topic {topic!r} has no phrasings")


def _topic(name: str, domain: str, description: str, build: Callable[[], list[Question]]
           ) -> Topic:
    return Topic(name, domain, description, build, phrasings=phrasings_of(name))


def _invented_topic(name: str) -> Topic:
    domain, real, pattern, _ = invented.TEMPLATES[name]
    return Topic(
        name, domain, f"invented entities: {pattern.format(name='<invented>')}",
        lambda: invented.build_invented(templates=[name]), invented=True,
        phrasings=phrasings_of(real),
    )


TOPICS: dict[str, Topic] = {
    t.name: t
    for t in [
        _topic("country_capital", "geography", "capital of a country (countryinfo + geonames)",
              countries.build_country_capital),
        _topic("country_currency", "geography", "currency of a country",
              countries.build_country_currency),
        _topic("country_language", "geography", "official language of a country",
              countries.build_country_language),
        _topic("country_continent", "geography", "continent of a country",
              countries.build_country_continent),
        _topic("city_country", "geography", "country of a city of 1M+ people (geonames)",
              countries.build_city_country),
        _topic("element_symbol", "chemistry", "chemical symbol of an element (mendeleev)",
              elements.build_element_symbol),
        _topic("element_number", "chemistry", "atomic number of an element",
              elements.build_element_number),
        _topic("element_from_symbol", "chemistry", "element with a given symbol",
              elements.build_element_from_symbol),
        _topic("element_discoverer", "chemistry", "discoverer of an element",
              elements.build_element_discoverer),
        _topic("state_capital", "us_states", "capital of a US state (us)",
              us_states.build_state_capital),
        _topic("state_abbreviation", "us_states", "postal abbreviation of a US state",
              us_states.build_state_abbreviation),
        _topic("state_statehood", "us_states", "year a US state joined the union",
              us_states.build_state_statehood),
        _topic("language_code", "languages", "ISO 639-1 code of a language (pycountry, langcodes)",
               languages.build_language_code),
        _topic("language_from_code", "languages", "language of an ISO 639-1 code",
               languages.build_language_from_code),
        _topic("language_script", "languages", "usual script of a language (language-data)",
               languages.build_language_script),
        _topic("language_autonym", "languages", "a language's name for itself (langcodes)",
               languages.build_language_autonym),
        _topic("currency_code", "currencies", "ISO 4217 code of a currency (pycountry)",
               currencies.build_currency_code),
        _topic("currency_from_code", "currencies", "currency of an ISO 4217 code",
               currencies.build_currency_from_code),
        _topic("airport_iata", "aviation", "IATA code of an international airport (airportsdata)",
               airports.build_airport_iata),
        _topic("airport_icao", "aviation", "ICAO code of an international airport",
               airports.build_airport_icao),
        _topic("airport_city", "aviation", "city an IATA airport code serves",
               airports.build_airport_city),
        _topic("independence_day", "holidays", "date of a country's Independence Day (holidays)",
               national_days.build_independence_day),
        _topic("national_day", "holidays", "date of a country's National Day (holidays)",
               national_days.build_national_day),
        _topic("country_alpha2", "country_codes", "ISO 3166 alpha-2 code of a country "
               "(countryinfo)", country_facts.build_country_alpha2),
        _topic("country_alpha3", "country_codes", "ISO 3166 alpha-3 code of a country",
               country_facts.build_country_alpha3),
        _topic("country_tld", "country_codes", "internet top-level domain of a country",
               country_facts.build_country_tld),
        _topic("country_demonym", "country_names", "what people of a country are called",
               country_facts.build_country_demonym),
        _topic("country_native_name", "country_names", "a country's name in its own language",
               country_facts.build_country_native_name),
        _topic("country_spanish_name", "country_names", "a country's name in Spanish",
               country_facts.build_country_spanish_name),
        _topic("country_german_name", "country_names", "a country's name in German",
               country_facts.build_country_german_name),
    ]
    + [_topic(name, p.domain, "a few sentences about an entity (" + ", ".join(p.attributes)
              + "), labelled claim by claim", longform.builder(name))
       for name, p in longform.PROFILES.items()]
    + [_invented_topic(name) for name in invented.TEMPLATES]
}

# The topics before breadth (issue 22): three domains, one wording each at the time.
CORE_TOPICS: tuple[str, ...] = (
    "country_capital", "country_currency", "country_language", "country_continent",
    "city_country", "element_symbol", "element_number", "element_from_symbol",
    "element_discoverer", "state_capital", "state_abbreviation", "state_statehood",
)
# Every real topic with its invented twin: the breadth training set.
BREADTH_TOPICS: tuple[str, ...] = tuple(TOPICS)
# The long-form (multi-claim) topics and their twins.
LONGFORM_TOPICS: tuple[str, ...] = tuple(
    n for n in TOPICS if n.removeprefix("invented_") in longform.PROFILES)
# Named selections ``build_dataset`` (and ``--topics``) accept beside topic names; "core"
# keeps the three original domains with their invented twins.
SELECTIONS: dict[str, tuple[str, ...]] = {
    "breadth": BREADTH_TOPICS,
    "longform": LONGFORM_TOPICS,
    "short": tuple(n for n in TOPICS if n not in LONGFORM_TOPICS),
    "core": tuple(n for n, t in TOPICS.items()
                  if n in CORE_TOPICS or (t.invented and n.removeprefix("invented_")
                                          in CORE_TOPICS)),
}


def resolve_topics(names: Sequence[str] | None) -> list[str]:
    """Topic names with selections expanded (order kept, repeats dropped); all when empty."""
    out: list[str] = []
    for name in names or list(TOPICS):
        for topic in SELECTIONS.get(name, (name,)):
            if topic not in out:
                out.append(topic)
    unknown = [n for n in out if n not in TOPICS]
    if unknown:
        raise ValueError(f"unknown topic(s) {unknown}; known: {', '.join(TOPICS)}; "
                         f"selections: {', '.join(SELECTIONS)}")
    return out


def build_dataset(
    topics: Sequence[str] | None = None,
    *,
    limit_per_topic: int | None = None,
    invented_per_template: int = 30,
    seed: int = 0,
) -> list[Question]:
    """Questions of the chosen topics (all by default; selection names such as
    ``breadth`` expand), subsampled reproducibly per topic, each in the wording
    :func:`probes.datasets.phrasing.rephrase` picks for it with ``seed``.

    Questions about held-out entities (:mod:`probes.datasets.heldout_entities`) are
    dropped here, before any subsampling, so no training set can contain them.
    """
    names = resolve_topics(topics)
    real = [n for n in names if not TOPICS[n].invented]
    fake = [n for n in names if TOPICS[n].invented]
    out: list[Question] = []
    for name in real:
        built = TOPICS[name].build()
        questions = [q for q in built if not is_heldout_entity(q.entity)]
        if limit_per_topic is not None and len(questions) > limit_per_topic:
            questions = random.Random(f"{seed}:{name}").sample(questions, limit_per_topic)
            questions.sort(key=lambda q: q.id)
        logger.info("topic %s: %d questions (%d held out)", name, len(questions),
                    len(built) - len(questions))
        out.extend(questions)
    if fake:
        per = invented_per_template if limit_per_topic is None else min(
            invented_per_template, limit_per_topic)
        made = invented.build_invented(per_template=per, seed=seed, templates=fake,
                                       skip=is_heldout_entity)
        logger.info("invented topics %s: %d questions", fake, len(made))
        out.extend(made)
    out = [rephrase(q, TOPICS[q.topic].phrasings, seed=seed) for q in out]
    leaked = [q.id for q in out if is_heldout_entity(q.entity)]
    if leaked:
        raise AssertionError(f"held-out entities reached a training set: {leaked[:5]}")
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"duplicate question ids: {dupes}")
    return out


def write_questions(questions: Iterable[Question], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(q.model_dump_json() + "\n")
    tmp.replace(path)
    return path


def read_questions(path: str | Path) -> list[Question]:
    path = Path(path)
    out: list[Question] = []
    errors: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(Question.model_validate_json(line))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                loc = ".".join(str(x) for x in first["loc"]) or "(line)"
                errors.append(f"{path}:{lineno}: {loc}: {first['msg']}")
    if errors:
        raise ValueError("invalid question file:\n" + "\n".join(errors[:20]))
    return out


def questions_hash(questions: Iterable[Question]) -> str:
    digest = hashlib.sha256()
    for q in questions:
        digest.update(json.dumps(q.model_dump(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


__all__ = ["BREADTH_TOPICS", "CORE_TOPICS", "LONGFORM_TOPICS", "SELECTIONS", "TOPICS", "Topic", "build_dataset",
           "phrasings_of", "resolve_topics", "questions_hash", "read_questions",
           "write_questions"]
