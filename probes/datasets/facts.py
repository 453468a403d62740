"""What the knowledge-base builders added for breadth share: one question constructor.

Each builder module keeps ``SHOTS`` (few-shot examples, worded with the topic's first
phrasing) and ``PHRASINGS`` per topic, and writes its questions through :func:`fact`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from probes.datasets.schema import AnswerType, Question, Shot


def unique(items: Sequence[str]) -> list[str]:
    """Items stripped, empty ones and case-insensitive repeats dropped, order kept."""
    seen: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if item and item.casefold() not in seen:
            seen[item.casefold()] = item
    return list(seen.values())


def shot_list(shots: Mapping[str, Sequence[tuple[str, str]]], topic: str) -> list[Shot]:
    return [Shot(question=q, answer=a) for q, a in shots[topic]]


def fact(topic: str, domain: str, *, key: str, entity: str, subject: str, question: str,
         answers: Sequence[str], shots: list[Shot], near: Sequence[str] = (),
         answer_type: AnswerType = "text") -> Question:
    """A question ``topic:key`` about ``entity`` (the split unit)."""
    return Question(id=f"{topic}:{key}", topic=topic, domain=domain, entity=entity,
                    subject=subject, question=question, answers=unique(answers),
                    near_misses=unique(near), answer_type=answer_type, shots=shots)


__all__ = ["fact", "shot_list", "unique"]
