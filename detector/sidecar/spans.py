"""Cut generated text into spans and turn token scores into span verdicts.

Span kinds:

- ``word``: a maximal run of letters, digits and inner punctuation ("Samarkhand", "3.14",
  "O'Neill");
- ``entity``: a run of capitalised or numeric words ("New South Wales", "1492"), the unit
  entity-level hallucination probes are usually judged on;
- ``sentence``: up to and including ., ! or ? followed by whitespace, or the end.

A span's score aggregates the scores of the tokens that overlap it, by the probe's
aggregation (max by default: one fabricated token makes the span fabricated); its
calibrated probability is compared with the probe's threshold.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from detector.sidecar.text import DecodedText

SPAN_KINDS = ("word", "entity", "sentence")
_WORD = re.compile(r"[^\W_](?:[\w'’.\-]*[^\W_])?", re.UNICODE)
_SENTENCE = re.compile(r"\S.*?(?:[.!?](?=\s|$)|$)", re.DOTALL)
_ENTITY_WORD = re.compile(r"^(?:[A-Z0-9À-Þ]|\d)")


@dataclass(frozen=True, slots=True)
class Span:
    kind: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    text: str


@dataclass(frozen=True, slots=True)
class SpanVerdict:
    span: Span
    probe: str
    score: float
    threshold: float
    flagged: bool


def find_spans(decoded: DecodedText, kinds: Sequence[str] = ("entity", "sentence")) -> list[Span]:
    """Spans of the requested kinds, each mapped to the generated tokens that overlap it."""
    text = decoded.text
    ranges: list[tuple[str, int, int]] = []
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    if "word" in kinds:
        ranges += [("word", s, e) for s, e in words]
    if "entity" in kinds:
        ranges += [("entity", s, e) for s, e in _entities(text, words)]
    if "sentence" in kinds:
        ranges += [("sentence", m.start(), m.end()) for m in _SENTENCE.finditer(text)
                   if m.group().strip()]
    spans = []
    for kind, start, end in ranges:
        tokens = _overlapping_tokens(decoded, start, end)
        if tokens is not None:
            spans.append(Span(kind, start, end, tokens[0], tokens[1], text[start:end]))
    return spans


def _entities(text: str, words: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge consecutive capitalised/numeric words separated only by spaces."""
    out: list[tuple[int, int]] = []
    run: tuple[int, int] | None = None
    for s, e in words:
        if _ENTITY_WORD.match(text[s:e]):
            if run is not None and text[run[1]:s].strip(" ") == "" and "\n" not in text[run[1]:s]:
                run = (run[0], e)
            else:
                if run is not None:
                    out.append(run)
                run = (s, e)
        elif run is not None:
            out.append(run)
            run = None
    if run is not None:
        out.append(run)
    return out


def _overlapping_tokens(decoded: DecodedText, start: int, end: int) -> tuple[int, int] | None:
    first = last = None
    for i, (s, e) in enumerate(zip(decoded.starts, decoded.ends)):
        if e > start and s < end:
            first = i if first is None else first
            last = i
    return None if first is None else (first, last + 1)


def judge_spans(
    spans: Sequence[Span],
    token_scores: Sequence[dict[str, float]],
    probes: Sequence[tuple[str, str, float]],
) -> list[SpanVerdict]:
    """One verdict per (span, probe) with at least one scored token.

    ``probes`` lists (name, aggregation, threshold); ``token_scores[i]`` maps probe name to
    the calibrated probability of generated token i (absent when unscored).
    """
    verdicts = []
    for span in spans:
        for name, aggregation, threshold in probes:
            values = [token_scores[i][name] for i in range(span.token_start, span.token_end)
                      if name in token_scores[i]]
            if not values:
                continue
            score = max(values) if aggregation == "max" else sum(values) / len(values)
            verdicts.append(SpanVerdict(span, name, score, threshold, score >= threshold))
    return verdicts
