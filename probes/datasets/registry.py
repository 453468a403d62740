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

from probes.datasets import countries, elements, invented, us_states
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.schema import Question

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topic:
    name: str
    domain: str
    description: str
    build: Callable[[], list[Question]]
    invented: bool = False


def _invented_topic(name: str) -> Topic:
    domain, real, pattern, _ = invented.TEMPLATES[name]
    return Topic(
        name, domain, f"invented entities: {pattern.format(name='<invented>')}",
        lambda: invented.build_invented(templates=[name]), invented=True,
    )


TOPICS: dict[str, Topic] = {
    t.name: t
    for t in [
        Topic("country_capital", "geography", "capital of a country (countryinfo + geonames)",
              countries.build_country_capital),
        Topic("country_currency", "geography", "currency of a country",
              countries.build_country_currency),
        Topic("country_language", "geography", "official language of a country",
              countries.build_country_language),
        Topic("country_continent", "geography", "continent of a country",
              countries.build_country_continent),
        Topic("city_country", "geography", "country of a city of 1M+ people (geonames)",
              countries.build_city_country),
        Topic("element_symbol", "chemistry", "chemical symbol of an element (mendeleev)",
              elements.build_element_symbol),
        Topic("element_number", "chemistry", "atomic number of an element",
              elements.build_element_number),
        Topic("element_from_symbol", "chemistry", "element with a given symbol",
              elements.build_element_from_symbol),
        Topic("element_discoverer", "chemistry", "discoverer of an element",
              elements.build_element_discoverer),
        Topic("state_capital", "us_states", "capital of a US state (us)",
              us_states.build_state_capital),
        Topic("state_abbreviation", "us_states", "postal abbreviation of a US state",
              us_states.build_state_abbreviation),
        Topic("state_statehood", "us_states", "year a US state joined the union",
              us_states.build_state_statehood),
    ]
    + [_invented_topic(name) for name in invented.TEMPLATES]
}


def build_dataset(
    topics: Sequence[str] | None = None,
    *,
    limit_per_topic: int | None = None,
    invented_per_template: int = 30,
    seed: int = 0,
) -> list[Question]:
    """Questions of the chosen topics (all by default), subsampled reproducibly per topic.

    Questions about held-out entities (:mod:`probes.datasets.heldout_entities`) are
    dropped here, before any subsampling, so no training set can contain them.
    """
    names = list(topics) if topics else list(TOPICS)
    unknown = [n for n in names if n not in TOPICS]
    if unknown:
        raise ValueError(f"unknown topic(s) {unknown}; known: {', '.join(TOPICS)}")
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


__all__ = ["TOPICS", "Topic", "build_dataset", "questions_hash", "read_questions",
           "write_questions"]
