"""One request as the sidecar keeps it: its tokens, scored rows, features and what changed.

:class:`RequestRecord` is what :class:`~detector.sidecar.store.RequestStore` holds per
request, and the functions here are the only ways a step changes one: each keeps the
record's byte count (the store's memory bound) and its dirty marks (what the request's
incremental analysis must read again, :meth:`RequestStore.delta`) right.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detector.channel.wire import StopRule
from detector.sidecar.scores import ProbeColumns, TokenScore, token_scores

ROW_OVERHEAD = 96  # bytes of dict entry + array header per stored row, roughly
MAX_GAP = 1 << 16  # missing tokens filled in at once; more is treated as corrupt
# Prompt tokens kept per request: the last few prime decoding of the first generated piece,
# all of them tell a claim from a name copied from the prompt (detector.claims).
PROMPT_TAIL = 256


@dataclass(slots=True)
class RequestRecord:
    req_id: str
    engine_id: str
    num_prompt_tokens: int
    generated: list[int] = field(default_factory=list)
    generated_ns: list[int] = field(default_factory=list)  # step end time per token
    prompt_tail: list[int] = field(default_factory=list)
    rows: dict[int, tuple[ProbeColumns, np.ndarray]] = field(default_factory=dict)
    finished: bool = False
    incomplete: str | None = None
    created: float = field(default_factory=time.monotonic)
    updated: float = field(default_factory=time.monotonic)
    version: int = 0
    nbytes: int = 0
    accounted: bool = False
    # Ended by the sidecar (``end_running``), not by the engine: may still be running.
    inferred_end: bool = False
    # The engine's clock (``time_ns``) at the last step that ran it.
    last_step_ns: int = 0
    # Token feature name -> one value per generated token (NaN: not received); hybrid probes.
    features: dict[str, list[float]] = field(default_factory=dict)
    # Stop strings the API process applies (detector.sidecar.stops); None when it has none.
    stop: StopRule | None = None
    # What changed since the request's analysis last read it (:meth:`RequestStore.delta`):
    # the lowest generated token whose id changed (0: the prompt or the stop rule did), and
    # the lowest whose scores, time or features did. None: nothing.
    dirty_ids: int | None = None
    dirty_scores: int | None = None
    # The request's analysis, advanced as it grows (detector.sidecar.incremental), and the
    # memory it holds as counted in ``nbytes``.
    live: Any = None
    live_nbytes: int = 0

    def token_scores(self, columns: ProbeColumns | None, start: int = 0) -> list[TokenScore]:
        """Every generated token from ``start`` on, in order, with whatever scores exist."""
        return token_scores(self.generated, self.generated_ns, self.num_prompt_tokens,
                            self.rows, columns, start)


@dataclass(slots=True)
class RecordDelta:
    """What a request's analysis needs to catch up, read in one go under the store's lock:
    only what changed since it last read (:meth:`RequestStore.delta`)."""

    record: RequestRecord  # the request's state, without its per-token lists
    columns: ProbeColumns | None
    restart: bool  # a token already read changed: the analysis starts again
    start: int  # ``token_ids`` are the generated tokens from here on
    token_ids: list[int]
    scores_from: int  # ``tokens`` (and ``logprob``) from here on
    tokens: list[TokenScore]
    logprob: list[float] | None
    prompt_tail: list[int]


def mark_scores(rec: RequestRecord, g: int) -> None:
    """Generated token ``g`` and those after it may score differently now (a row at
    position p scores token p and, as its producer, token p + 1)."""
    g = max(g, 0)
    rec.dirty_scores = g if rec.dirty_scores is None else min(rec.dirty_scores, g)


def set_per_token(rec: RequestRecord, values: list, g: int, value: object,
                  fill: object) -> None:
    """``values[g] = value`` in one of the record's per-token lists (times, features),
    grown with ``fill`` as far as a plausible gap (``MAX_GAP``) and counted in its bytes."""
    if g < 0 or g - len(values) > MAX_GAP:
        return
    mark_scores(rec, min(g, len(values)))
    if g >= len(values):
        rec.nbytes += 8 * (g + 1 - len(values))
        values.extend([fill] * (g + 1 - len(values)))
    values[g] = value


def set_prompt_tail(rec: RequestRecord, i: int, token: int) -> None:
    tail = rec.prompt_tail
    if len(tail) < PROMPT_TAIL:
        rec.nbytes += 8 * (PROMPT_TAIL - len(tail))
        tail.extend([-1] * (PROMPT_TAIL - len(tail)))
    if tail[i] != token:
        tail[i] = token
        rec.dirty_ids = 0


def set_generated(rec: RequestRecord, g: int, token: int) -> None:
    if g < 0:
        return
    if g < len(rec.generated):
        if rec.generated[g] != token:
            rec.generated[g] = token
            rec.dirty_ids = g if rec.dirty_ids is None else min(rec.dirty_ids, g)
    elif g == len(rec.generated):
        rec.generated.append(token)
        rec.nbytes += 8
    else:  # a gap: tokens we never saw
        rec.nbytes += 8 * (g + 1 - len(rec.generated))
        rec.generated.extend([-1] * (g - len(rec.generated)))
        rec.generated.append(token)
        if rec.incomplete is None:
            rec.incomplete = "some tokens were never received"


def stop_rule_nbytes(rule: StopRule) -> int:
    """Memory a stored stop rule holds, roughly: its strings plus per-string overhead."""
    return ROW_OVERHEAD + sum(len(s.encode("utf-8")) + 56 for s in rule.strings)


__all__ = ["MAX_GAP", "PROMPT_TAIL", "ROW_OVERHEAD", "RecordDelta", "RequestRecord",
           "mark_scores", "set_generated", "set_per_token", "set_prompt_tail",
           "stop_rule_nbytes"]
