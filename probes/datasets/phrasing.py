"""Several wordings of each topic's question, one chosen per question (seeded).

A probe trained on one wording per topic can learn the wording instead of the fact. Every
topic lists at least three templates (``{name}`` is the slot); builders write the first
(canonical) one, and :func:`rephrase` swaps in the template picked for that question by a
stable hash of ``(seed, question id)``: one question, one request, and over a topic the
templates are used about equally, so a capture covers every wording without multiplying
its request count. The shots are re-worded with the same template (the question reads
like its examples), and ``Question.phrasing`` records the index for slicing results.
The entity is untouched, so every wording of an entity stays on its side of a split.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence

from probes.datasets.schema import Question, Shot

MIN_PHRASINGS = 3


def choose(question_id: str, n: int, seed: int = 0) -> int:
    """Index of the template for ``question_id`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"phrasing:{seed}:{question_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % n


@functools.lru_cache(maxsize=256)
def _slot_pattern(template: str) -> re.Pattern[str]:
    head, sep, tail = template.partition("{name}")
    if not sep:
        raise ValueError(f"template {template!r} has no {{name}} slot")
    return re.compile(re.escape(head) + "(.+)" + re.escape(tail))


def slot_of(template: str, text: str) -> str:
    """The slot value of ``text`` written with ``template`` ("France" from "What is the
    capital of France?"); ValueError when the text does not follow the template."""
    m = _slot_pattern(template).fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not worded as {template!r}")
    return m.group(1)


def rephrase(question: Question, templates: Sequence[str], *, seed: int = 0) -> Question:
    """``question`` (worded with ``templates[0]``) and its shots in the chosen wording."""
    if len(templates) < 2:
        return question
    canonical = templates[0]
    index = choose(question.id, len(templates), seed)
    template = templates[index]
    shots = [Shot(question=template.format(name=slot_of(canonical, s.question)), answer=s.answer)
             for s in question.shots]
    return Question.model_validate({
        **question.model_dump(),
        "question": template.format(name=slot_of(canonical, question.question)),
        "shots": [s.model_dump() for s in shots],
        "phrasing": index,
    })


__all__ = ["MIN_PHRASINGS", "choose", "rephrase", "slot_of"]
