"""The sidecar's per-request results, kept bounded in time and memory.

A thread-safe store of :class:`~detector.sidecar.records.RequestRecord` by engine id, with
a time-to-live (finished and idle requests expire) and a memory bound (the oldest finished
requests go first). One writer, the scoring thread (:meth:`RequestStore.ingest`, heartbeats
through :meth:`RequestStore.note_engine`); many readers, who find a request by any id a
client knows it by (:mod:`detector.sidecar.aliases`), wait for it to change (threads on
the condition, coroutines through its listeners) and read what changed
(:meth:`RequestStore.delta`). Its parts, a module each: the record and how a step changes
it (:mod:`~detector.sidecar.records`), per-token score resolution
(:mod:`~detector.sidecar.scores`), the engines' sequences and clocks
(:mod:`~detector.sidecar.engine_clock`) and hybrid probes' token features
(:mod:`~detector.sidecar.token_inputs`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.channel.wire import RefusedRows, StepHeader
from detector.log_throttle import LogThrottle
from detector.sidecar.aliases import RequestAliases
from detector.sidecar.changes import ListenedCondition
from detector.sidecar.engine_clock import EngineClock
from detector.sidecar.records import (
    PROMPT_TAIL,
    ROW_OVERHEAD,
    RecordDelta,
    RequestRecord,
    mark_scores,
    set_generated,
    set_per_token,
    set_prompt_tail,
    stop_rule_nbytes,
)
from detector.sidecar.scores import ProbeColumns, TokenScore
from detector.sidecar.token_inputs import sampled_features, token_feature_inputs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StoreStats:
    requests: int
    bytes: int
    evicted: int
    expired: int
    incomplete: int


class RequestStore:
    """Thread-safe per-request results with a time-to-live and a memory bound."""

    def __init__(
        self,
        *,
        max_requests: int = 10_000,
        max_bytes: int = 512 << 20,
        finished_ttl_s: float = 600.0,
        idle_ttl_s: float = 900.0,
    ) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.finished_ttl_s = finished_ttl_s
        self.idle_ttl_s = idle_ttl_s
        self._records: OrderedDict[str, RequestRecord] = OrderedDict()
        # Every id a client may ask by -> the engine ids known by it, oldest first. An id can
        # be shared (a reused X-Request-Id, a retry): a lookup returns the newest request.
        self._aliases = RequestAliases()
        self.refused_finished = 0  # steps that tried to change an ended request
        self.refused_rows = 0  # requests' shares of steps that did not validate
        self._bytes = 0
        # The engines' sequences and clocks (replays, gaps, quiet), as their messages say.
        self._clock = EngineClock()
        self._refusal_log = LogThrottle()
        self._rows_log = LogThrottle()
        self.columns: ProbeColumns | None = None
        self.evicted = 0
        self.expired = 0
        self.incomplete = 0
        # Threads wait on it; coroutines hear of the same changes through its listeners.
        self._cond = ListenedCondition()

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (the store's lock held: it must not block or read the store)
        after every change a waiter may wait for."""
        self._cond.listeners.append(listener)

    # ----------------------------------------------------------------- writing
    @property
    def stale(self) -> int:
        """Steps refused as replays or out of order."""
        return self._clock.stale

    @property
    def gaps(self) -> int:
        """Runs of steps that never arrived."""
        return self._clock.gaps

    def set_columns(self, columns: ProbeColumns | None) -> None:
        with self._cond:
            self.columns = columns
            self._cond.notify_all()

    def note_engine(self, engine_id: str, next_seq: int | None = None,
                    time_ns: int | None = None) -> None:
        """A heartbeat from ``engine_id`` (sent at ``time_ns``, engine clock): detect
        restarts and silent drops."""
        with self._cond:
            for engine, reason in self._clock.heartbeat(engine_id, next_seq, time_ns):
                self._mark_active_incomplete(engine, reason)
            self._cond.notify_all()

    def is_stale(self, engine_id: str, seq: int) -> bool:
        """A step this store already has, or one older than a step it has (out of order)."""
        with self._cond:
            return self._clock.is_stale(engine_id, seq)

    def ingest(
        self,
        header: StepHeader,
        positions_scored: np.ndarray,
        probs: np.ndarray | None,
        columns: ProbeColumns | None,
    ) -> bool:
        """Record one step. ``probs[i]`` scores the row at global row index
        ``positions_scored[i]`` of the step (rows not listed were not scored).

        A replayed or out-of-order step (seq not above the engine's newest) is refused and
        False returned: it could only repeat what is known or rewind newer state (revive a
        finished request). Its rows are lost; the gap its late arrival left is already
        marked."""
        engine = header.engine_id
        now = time.monotonic()
        with self._cond:
            marks = self._clock.step(engine, header.seq, header.time_ns)
            if marks is None:
                return False
            for engine_id, reason in marks:
                self._mark_active_incomplete(engine_id, reason)
            row_of = {int(r): i for i, r in enumerate(positions_scored)}
            for req in header.requests:
                rec = self._records.get(req.req_id)
                if rec is not None and rec.finished and not rec.inferred_end:
                    # The engine said it ended: what it was is settled. vLLM's ids are unique
                    # (it adds a random suffix), so only a replay, a forgery or
                    # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION can get here.
                    self._refuse_finished(req.req_id, header.seq)
                    continue
                if rec is None:
                    rec = RequestRecord(req.req_id, engine, req.num_prompt_tokens)
                    if req.first_position > max(req.num_prompt_tokens - 1, 0):
                        rec.incomplete = "capture started after the request began"
                        self.incomplete += 1
                        logger.info("request %s first seen at position %d (prompt of %d "
                                    "tokens, step %d): its earlier steps were not received "
                                    "(the hook has dropped %d steps in all)",
                                    req.req_id, req.first_position, req.num_prompt_tokens,
                                    header.seq, header.dropped_total)
                    self._records[req.req_id] = rec
                    self._aliases.add(req.req_id)
                else:
                    self._records.move_to_end(req.req_id)
                before = rec.nbytes
                if req.stop is not None and rec.stop is None:
                    rec.stop = req.stop
                    rec.nbytes += stop_rule_nbytes(req.stop)
                    rec.dirty_ids = 0
                p0 = rec.num_prompt_tokens
                for j, token in enumerate(req.input_token_ids):
                    pos = req.first_position + j
                    if pos >= p0:
                        set_generated(rec, pos - p0, token)
                    elif pos >= p0 - PROMPT_TAIL:
                        set_prompt_tail(rec, pos - (p0 - PROMPT_TAIL), token)
                    i = row_of.get(req.row_offset + j)
                    if i is not None and probs is not None and columns is not None:
                        old = rec.rows.get(pos)
                        if old is not None:  # re-scored (recompute): replace, don't add
                            rec.nbytes -= old[1].nbytes + ROW_OVERHEAD
                        rec.rows[pos] = (columns, probs[i])
                        rec.nbytes += probs[i].nbytes + ROW_OVERHEAD
                        mark_scores(rec, pos - p0)
                end = req.first_position + req.num_rows
                for k, token in enumerate(req.sampled_token_ids):
                    set_generated(rec, end + k - p0, token)
                    set_per_token(rec, rec.generated_ns, end + k - p0, header.time_ns, 0)
                for name, values in sampled_features(req).items():
                    for k, value in enumerate(values):
                        set_per_token(rec, rec.features.setdefault(name, []),
                                      end + k - p0, float(value), float("nan"))
                if req.sampled_token_ids:
                    rec.finished = rec.inferred_end = False
                rec.updated = now
                rec.last_step_ns = max(rec.last_step_ns, header.time_ns)
                rec.version += 1
                self._bytes += rec.nbytes - before
            for req_id in header.finished:
                rec = self._records.get(req_id)
                if rec is not None:
                    rec.finished = True
                    rec.inferred_end = False
                    rec.version += 1
            for refused in header.refused:
                self._refuse_rows(refused, header.seq)
            self._enforce_bounds(now)
            self._cond.notify_all()
        return True

    def token_feature_inputs(
        self, header: StepHeader, positions_scored: np.ndarray, names: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token features for the rows of ``header`` about to be scored, before the step is
        ingested: ``(own, producer)`` (:func:`detector.sidecar.token_inputs.
        token_feature_inputs`), read under the store's lock."""
        with self._cond:
            return token_feature_inputs(self._records, header, positions_scored, names)

    def engine_quiet_s(self, engine_id: str) -> float:
        """How long ``engine_id`` had run no step when it last sent a message, by its own
        clock (0 before its first step). Heartbeats come only once the hook's queue is
        empty and travel behind every step, so this never counts steps not read yet."""
        with self._cond:
            return self._clock.quiet_s(engine_id)

    def end_running(self, engine_id: str, *, reason: str | None = None, quiet_s: float = 0.0,
                    only_incomplete: bool = False) -> list[str]:
        """End requests of ``engine_id`` still running (and in no step for ``quiet_s`` of
        the engine's clock, and, with ``only_incomplete``, already missing steps); returns
        their ids.

        With no ``reason`` they end finished: vLLM ended them in a step the hook did not
        see (a step without tokens once the engine went idle: an abort, a client timeout, a
        stop string matched by the API server; or a dropped step, for a request already
        marked incomplete). With a ``reason`` (the hook fell silent) they end incomplete. A
        request that turns out to be running after all is revived by its next token."""
        ended = []
        with self._cond:
            engine_now = self._clock.now_ns(engine_id)
            for rec in self._records.values():
                if rec.engine_id != engine_id or rec.finished:
                    continue
                if engine_now - rec.last_step_ns < quiet_s * 1e9:
                    continue
                if only_incomplete and rec.incomplete is None:
                    continue
                if reason is not None and rec.incomplete is None:
                    rec.incomplete = reason
                    self.incomplete += 1
                rec.finished = rec.inferred_end = True
                rec.version += 1
                ended.append(rec.req_id)
            if ended:
                self._cond.notify_all()
        return ended

    def _mark_active_incomplete(self, engine_id: str, reason: str) -> None:
        for rec in self._records.values():
            running = not rec.finished or rec.inferred_end  # an inferred end may be wrong
            if rec.engine_id == engine_id and running and rec.incomplete is None:
                rec.incomplete = reason
                rec.version += 1
                self.incomplete += 1

    def _enforce_bounds(self, now: float) -> None:
        for req_id in list(self._records):
            rec = self._records[req_id]
            ttl = self.finished_ttl_s if rec.finished else self.idle_ttl_s
            if now - rec.updated > ttl:
                self._drop(req_id)
                self.expired += 1
        while self._records and (
            len(self._records) > self.max_requests or self._bytes > self.max_bytes
        ):
            victim = next((k for k, r in self._records.items() if r.finished), None)
            self._drop(victim or next(iter(self._records)))
            self.evicted += 1

    def _drop(self, req_id: str) -> None:
        rec = self._records.pop(req_id)
        self._bytes -= rec.nbytes
        self._aliases.remove(req_id)

    def _refuse_rows(self, refused: RefusedRows, seq: int) -> None:
        """One request's share of a step did not validate (``wire.decode`` kept its
        step-mates'): that request, when known and still running, is incomplete (one the
        engine ended is settled, as in :meth:`ingest`). The lock is held."""
        self.refused_rows += 1
        rec = self._records.get(refused.req_id) if refused.req_id is not None else None
        settled = rec is not None and rec.finished and not rec.inferred_end
        if rec is not None and not settled and rec.incomplete is None:
            rec.incomplete = f"the channel refused its part of a step ({refused.reason})"
            rec.version += 1
            self.incomplete += 1
        if self._rows_log.ready():
            shown = refused.req_id[:64] if refused.req_id is not None else "(unreadable id)"
            logger.warning("step %d: the part of request %s was refused (%s); the other "
                           "requests of the step are kept (%d refused so far)", seq, shown,
                           refused.reason, self.refused_rows)

    def _refuse_finished(self, req_id: str, seq: int) -> None:
        self.refused_finished += 1
        if self._refusal_log.ready():
            logger.warning("step %d names request %s, which already ended: its part of the step "
                           "is refused (%d so far)", seq, req_id, self.refused_finished)

    def expire(self) -> None:
        with self._cond:
            self._enforce_bounds(time.monotonic())

    def claim_finished(self, req_id: str) -> bool:
        """True exactly once per finished request: whoever gets it does the accounting."""
        with self._cond:
            rec = self._records.get(req_id)
            if rec is None or not rec.finished or rec.accounted:
                return False
            rec.accounted = True
            return True

    # ----------------------------------------------------------------- reading
    def _known_by(self, request_id: str) -> list[str]:
        """The engine ids of the requests known by ``request_id`` (its own engine id, an
        X-Request-Id or a response id, long or odd ones in the hook's bounded form),
        oldest first; the lock is held."""
        return self._aliases.known_by(request_id)

    def _lookup(self, request_id: str) -> str | None:
        """The engine id of the newest request known by ``request_id``; the lock is held."""
        ids = self._known_by(request_id)
        return ids[-1] if ids else None

    def resolve_shared(self, request_id: str) -> tuple[str, int, int]:
        """The engine id ``request_id`` names now (the newest request known by it; the id
        itself when none is), how many requests are known by it (more than one: the id
        was reused) and how many of those are still running (more than one: the id cannot
        tell which one the caller means)."""
        with self._cond:
            ids = self._known_by(request_id)
            running = sum(1 for i in ids if not self._records[i].finished)
            return (ids[-1] if ids else request_id, len(ids), running)

    def resolve(self, request_id: str) -> str | None:
        with self._cond:
            return self._lookup(request_id)

    def wait_known(self, request_id: str, timeout_s: float) -> bool:
        """Block until ``request_id`` (or an alias of it) is known; False on timeout.

        Woken by the step that first mentions it, so a stream opened before its request
        starts gets the first token without a polling delay."""
        with self._cond:
            return self._cond.wait_for(lambda: self._lookup(request_id) is not None,
                                       timeout=max(0.0, timeout_s))

    def moved_on(self, engine_id: str, version: int) -> bool:
        """Whether request ``engine_id`` (a record's own id) has moved past ``version``:
        changed, ended, or gone. Read without the lock, for the gRPC event loop, which must
        not wait while the scoring thread ingests a step: each read is atomic under the GIL,
        and a change seen half-made only wakes the reader early (it then takes a snapshot)."""
        rec = self._records.get(engine_id)
        return rec is None or rec.version > version or rec.finished

    def snapshot(self, request_id: str) -> tuple[RequestRecord, list[TokenScore]] | None:
        """A consistent copy of one request's state and token scores."""
        with self._cond:
            req_id = self._lookup(request_id)
            if req_id is None:
                return None
            rec = self._records[req_id]
            copy = RequestRecord(
                rec.req_id, rec.engine_id, rec.num_prompt_tokens, list(rec.generated),
                list(rec.generated_ns), [t for t in rec.prompt_tail if t >= 0], {},
                rec.finished, rec.incomplete, rec.created, rec.updated,
                rec.version, rec.nbytes, stop=rec.stop,
                # Verdicts read the generated tokens' log-probabilities (detector.verdict).
                features={name: list(v) for name, v in rec.features.items()},
            )
            return copy, rec.token_scores(self.columns)

    def live(self, request_id: str, make: Callable[[RequestRecord], Any]
             ) -> tuple[str, Any] | None:
        """The engine id ``request_id`` names and its analysis (``make(record)`` makes it
        the first time); None for an unknown request."""
        with self._cond:
            req_id = self._lookup(request_id)
            if req_id is None:
                return None
            rec = self._records[req_id]
            if rec.live is None:
                rec.live = make(rec)
            return req_id, rec.live

    def delta(self, req_id: str, read: int, live_nbytes: int) -> RecordDelta | None:
        """What request ``req_id`` (an engine id) changed since its analysis read its first
        ``read`` generated tokens: new tokens, and the scores of tokens from the lowest that
        changed. The analysis's memory (``live_nbytes``) counts towards the store's bound.
        None once the request is gone."""
        with self._cond:
            rec = self._records.get(req_id)
            if rec is None:
                return None
            grown = live_nbytes - rec.live_nbytes
            rec.live_nbytes = live_nbytes
            rec.nbytes += grown
            self._bytes += grown
            restart = rec.dirty_ids is not None and rec.dirty_ids < read
            start = 0 if restart else min(read, len(rec.generated))
            scores_from = start if rec.dirty_scores is None else min(start, rec.dirty_scores)
            rec.dirty_ids = rec.dirty_scores = None
            logprob = rec.features.get("logprob")
            meta = RequestRecord(
                rec.req_id, rec.engine_id, rec.num_prompt_tokens, finished=rec.finished,
                incomplete=rec.incomplete, created=rec.created, updated=rec.updated,
                version=rec.version, nbytes=rec.nbytes, stop=rec.stop)
            return RecordDelta(
                meta, self.columns, restart, start, rec.generated[start:], scores_from,
                rec.token_scores(self.columns, scores_from),
                logprob[scores_from:] if logprob is not None else None,
                [t for t in rec.prompt_tail if t >= 0] if start == 0 else [])

    def wait(
        self, request_id: str, *, after_version: int = -1, timeout_s: float | None = None,
        until_finished: bool = False,
    ) -> bool:
        """Block until the request changes (or finishes); False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def ready() -> bool:
            req_id = self._lookup(request_id)
            rec = self._records.get(req_id) if req_id is not None else None
            if rec is None:
                return False
            if until_finished:
                return rec.finished
            return rec.version > after_version or rec.finished

        with self._cond:
            while not ready():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
            return True

    def request_ids(self) -> list[str]:
        with self._cond:
            return list(self._records)

    def stats(self) -> StoreStats:
        with self._cond:
            return StoreStats(len(self._records), self._bytes, self.evicted, self.expired,
                              self.incomplete)


__all__ = ["RequestStore", "StoreStats"]
