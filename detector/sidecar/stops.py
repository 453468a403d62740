"""Cut a request's decoded text to what the API client received.

vLLM matches stop strings in the API process (its incremental detokenizer,
``vllm/v1/engine/detokenizer.py``), so the engine, and with it the sidecar, runs one or more
tokens past a stop the client never sees. This applies vLLM's rule to the sidecar's decoded
text: of every stop string's first occurrence that ends after the text of the first
``min_tokens`` tokens, the one that ends earliest wins (ties: list order, as
``check_stop_strings``); the text ends at its start, or at its end with
``include_stop_str_in_output``. A generated token is kept when it holds at least one
returned character.

While a request runs and no stop has matched, text that could still begin a stop string (a
partial match at the end) is held back, as vLLM holds it back when it streams, and so is
every token that reaches into it: a token is only ever returned with the text it will keep.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from detector.channel.wire import StopRule
from detector.sidecar.records import RequestRecord
from detector.sidecar.scores import TokenScore
from detector.sidecar.text import DecodedText


class StopCut(NamedTuple):
    decoded: DecodedText
    num_tokens: int  # generated tokens kept (a prefix)
    stopped: bool  # a stop string matched: the text is final whatever the engine does next


def find_stop(text: str, rule: StopRule, check_from: int = 0) -> tuple[int, int] | None:
    """(start, end) of the stop string vLLM matches in ``text``: the earliest-ending first
    occurrence among those ending after ``check_from``; None if none does."""
    best: tuple[int, int] | None = None
    for stop in rule.strings:
        start = text.find(stop, max(check_from - len(stop) + 1, 0))
        if start != -1 and (best is None or start + len(stop) < best[1]):
            best = (start, start + len(stop))
    return best


def partial_stop_start(text: str, rule: StopRule, end: int | None = None) -> int:
    """Where the longest tail of ``text[:end]`` that is a proper prefix of a stop string
    begins (``end`` when none is): text from there on may still turn out to be a stop."""
    n = len(text) if end is None else end
    hold = n
    if not n:
        return hold
    last = text[n - 1]
    for stop in rule.strings:
        for k in range(min(len(stop) - 1, n), 0, -1):
            if n - k >= hold:
                break  # shorter tails cannot start earlier
            if stop[k - 1] == last and text.endswith(stop[:k], 0, n):
                hold = n - k
                break
    return hold


def _clip(decoded: DecodedText, cut: int, num_tokens: int) -> DecodedText:
    return DecodedText(decoded.text[:cut],
                       [min(s, cut) for s in decoded.starts[:num_tokens]],
                       [min(e, cut) for e in decoded.ends[:num_tokens]])


def apply_stops(decoded: DecodedText, rule: StopRule | None, *, final: bool = True) -> StopCut:
    """``decoded`` cut to the text the client received (``final``: the request ended) or,
    while it runs, to the tokens whose text is certain to be returned as it is now."""
    n = len(decoded.starts)
    if rule is None:
        return StopCut(decoded, n, False)
    text = decoded.text
    # vLLM checks only once more than min_tokens are out, and only text after theirs.
    if rule.min_tokens >= n:
        match = None
    else:
        match = find_stop(text, rule, decoded.ends[rule.min_tokens - 1] if rule.min_tokens else 0)
    if match is not None:
        cut = match[1] if rule.include_in_output else match[0]
        kept = sum(1 for s in decoded.starts if s < cut)
        return StopCut(_clip(decoded, cut, kept), kept, True)
    if final or rule.include_in_output:
        # No stop yet: with include_stop_str_in_output a later match ends past all of this.
        return StopCut(decoded, n, False)
    hold = partial_stop_start(text, rule)
    kept = sum(1 for s, e in zip(decoded.starts, decoded.ends) if s < hold and e <= hold)
    end = decoded.ends[kept - 1] if kept else 0
    return StopCut(_clip(decoded, end, kept), kept, False)


def cut_to_returned(record: RequestRecord, tokens: list[TokenScore], decoded: DecodedText
                    ) -> tuple[RequestRecord, list[TokenScore], DecodedText]:
    """The analysis inputs cut to what the client received; a matched stop makes the
    record finished (the engine's abort arrives a step or more later)."""
    cut = apply_stops(decoded, record.stop, final=record.finished)
    if cut.stopped and not record.finished:
        record = dataclasses.replace(record, finished=True)
    return record, tokens[:cut.num_tokens], cut.decoded
