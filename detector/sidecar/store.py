"""Rebuild each request's generated token stream and keep its scores, bounded in time and memory.

A row at position p is the residual stream after the model read token p. A generated token
at position q can be scored from the row that produced it (q-1, available in the same step
as the token) or from its own row (q, available one step later; never for the final token,
which vLLM does not feed back). Each probe says which it uses; the store keeps per-row
probabilities and resolves them per token when read.

Requests are found by their engine id (``cmpl-X-0-1a2b3c4d``), by the response id the API
client sees (``cmpl-X`` / ``chatcmpl-X``) and by the ``X-Request-Id`` they were sent with
(``X``); long or odd ids by the bounded form the hook sends (``detector.channel.ids``).

Hybrid probes also read each generated token's features (log-probability, entropy),
which arrive with the token (``RequestRows.sampled_logprobs``/``sampled_entropies``); the
store keeps them per token so a row scored in a later step (``own``, or a recomputed
row) finds the features of the token it scores (:meth:`RequestStore.token_feature_inputs`).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detector.channel.ids import lookup_forms, request_aliases
from detector.channel.wire import RefusedRows, RequestRows, StepHeader, StopRule
from detector.log_throttle import LogThrottle
from detector.sidecar.changes import ListenedCondition
from detector.verdict import VerdictModel

logger = logging.getLogger(__name__)

_ROW_OVERHEAD = 96  # bytes of dict entry + array header per stored row, roughly
MAX_GAP = 1 << 16  # missing tokens filled in at once; more is treated as corrupt
# Prompt tokens kept per request: the last few prime decoding of the first generated piece,
# all of them tell a claim from a name copied from the prompt (detector.claims).
PROMPT_TAIL = 256


@dataclass(slots=True)
class ProbeColumns:
    """The probes a row was scored with (shared by every row scored together)."""

    names: tuple[str, ...]
    score_positions: tuple[str, ...]
    thresholds: tuple[float, ...]  # on each token's probability
    aggregations: tuple[str, ...] = ()
    # Per probe: its claim verdict (detector.verdict) and the threshold chosen on it for
    # the operator's target false-flag rate; None for a probe judged by its own scores.
    verdicts: tuple[tuple[VerdictModel, float] | None, ...] = ()

    @property
    def claim_thresholds(self) -> tuple[float, ...]:
        """Per probe, the threshold its claims are judged with (the verdict's if any)."""
        verdicts = self.verdicts or (None,) * len(self.names)
        return tuple(v[1] if v is not None else t for v, t in zip(verdicts, self.thresholds))

    def index(self, name: str) -> int | None:
        try:
            return self.names.index(name)
        except ValueError:
            return None


@dataclass(slots=True)
class TokenScore:
    position: int
    token_id: int
    # probe name -> calibrated probability; a probe missing here could not score the token.
    scores: dict[str, float]
    # Every row the active probes read for this token has arrived: its scores are final.
    settled: bool = False
    generated_ns: int = 0
    # probe name -> whether the row it was scored from lies outside the probe's training
    # summary (detector.drift); only probes that ship one, only rows that were scored.
    outside: dict[str, bool] = field(default_factory=dict)


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
        out = []
        for g in range(start, len(self.generated)):
            token = self.generated[g]
            q = self.num_prompt_tokens + g
            scores: dict[str, float] = {}
            outside: dict[str, bool] = {}
            settled = True
            if columns is not None:
                for name, where in zip(columns.names, columns.score_positions):
                    row = self.rows.get(q - 1 if where == "producer" else q)
                    if row is None:
                        settled = False
                        continue
                    i = row[0].index(name)
                    if i is not None:
                        value = float(row[1][i])
                        # NaN: a hybrid probe lacked token features. Nothing but a
                        # probability in [0, 1] ever leaves the API.
                        if 0.0 <= value <= 1.0:
                            scores[name] = value
                            # A row scored with drift carries, after the probabilities,
                            # one outside flag per probe (NaN: the probe has no summary).
                            flag = (float(row[1][len(row[0].names) + i])
                                    if len(row[1]) > len(row[0].names) else math.nan)
                            if not math.isnan(flag):
                                outside[name] = flag > 0.5
            when = self.generated_ns[g] if g < len(self.generated_ns) else 0
            out.append(TokenScore(position=q, token_id=token, scores=scores, settled=settled,
                                  generated_ns=when, outside=outside))
        return out


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
        self._aliases: dict[str, list[str]] = {}
        self.refused_finished = 0  # steps that tried to change an ended request
        self.refused_rows = 0  # requests' shares of steps that did not validate
        self._bytes = 0
        self._last_seq: dict[str, int] = {}
        # Highest step seq recorded per engine (heartbeats do not move it): a step at or
        # below it is a replay or arrived out of order, and is refused.
        self._max_step_seq: dict[str, int] = {}
        # The engine's clock per engine, as its messages tell it: the newest message and the
        # newest step. Quiet and idle are judged on this clock, never on the sidecar's, so a
        # sidecar that was stalled itself (SIGSTOP, starved of CPU) cannot take its own
        # unread backlog for an engine gone quiet.
        self._engine_ns: dict[str, int] = {}
        self._last_step_ns: dict[str, int] = {}
        self.stale = 0
        self.gaps = 0
        self._gap_log = LogThrottle()
        self._refusal_log = LogThrottle()
        self._rows_log = LogThrottle()
        self._engine_id: str | None = None
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
    def set_columns(self, columns: ProbeColumns | None) -> None:
        with self._cond:
            self.columns = columns
            self._cond.notify_all()

    def note_engine(self, engine_id: str, next_seq: int | None = None,
                    time_ns: int | None = None) -> None:
        """A heartbeat from ``engine_id`` (sent at ``time_ns``, engine clock): detect
        restarts and silent drops."""
        with self._cond:
            if time_ns is not None:
                self._engine_ns[engine_id] = max(self._engine_ns.get(engine_id, 0), time_ns)
            if self._engine_id is not None and engine_id != self._engine_id:
                self._mark_active_incomplete(self._engine_id, "the vLLM engine restarted")
            self._engine_id = engine_id
            if next_seq is not None:
                last = self._last_seq.get(engine_id)
                if last is not None and next_seq - 1 > last:
                    self._note_gap(engine_id, last + 1, next_seq - 1)
                    self._mark_active_incomplete(engine_id, "the channel dropped steps")
                    self._last_seq[engine_id] = next_seq - 1
            self._cond.notify_all()

    def _note_gap(self, engine_id: str, first: int, last: int) -> None:
        """Steps that never arrived: counted, and logged at most every 5 s."""
        self.gaps += 1
        if self._gap_log.ready():
            logger.warning("channel: steps %d..%d of engine %s never arrived (the hook dropped "
                           "them; %d gaps so far); requests running are marked incomplete",
                           first, last, engine_id[:8], self.gaps)

    def is_stale(self, engine_id: str, seq: int) -> bool:
        """A step this store already has, or one older than a step it has (out of order)."""
        with self._cond:
            return seq <= self._max_step_seq.get(engine_id, -1)

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
        engine = header.engine.engine_id
        now = time.monotonic()
        with self._cond:
            if header.seq <= self._max_step_seq.get(engine, -1):
                self.stale += 1
                return False
            self._max_step_seq[engine] = header.seq
            self._engine_ns[engine] = max(self._engine_ns.get(engine, 0), header.time_ns)
            self._last_step_ns[engine] = max(self._last_step_ns.get(engine, 0), header.time_ns)
            if self._engine_id is not None and engine != self._engine_id:
                self._mark_active_incomplete(self._engine_id, "the vLLM engine restarted")
            self._engine_id = engine
            last = self._last_seq.get(engine)
            if last is not None and header.seq > last + 1:
                self._note_gap(engine, last + 1, header.seq - 1)
                self._mark_active_incomplete(engine, "the channel dropped steps")
            self._last_seq[engine] = max(header.seq, last if last is not None else -1)
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
                    for alias in request_aliases(req.req_id):
                        self._aliases.setdefault(alias, []).append(req.req_id)
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
                        self._set_generated(rec, pos - p0, token)
                    elif pos >= p0 - PROMPT_TAIL:
                        self._set_prompt_tail(rec, pos - (p0 - PROMPT_TAIL), token)
                    i = row_of.get(req.row_offset + j)
                    if i is not None and probs is not None and columns is not None:
                        old = rec.rows.get(pos)
                        if old is not None:  # re-scored (recompute): replace, don't add
                            rec.nbytes -= old[1].nbytes + _ROW_OVERHEAD
                        rec.rows[pos] = (columns, probs[i])
                        rec.nbytes += probs[i].nbytes + _ROW_OVERHEAD
                        _mark_scores(rec, pos - p0)
                end = req.first_position + req.num_rows
                for k, token in enumerate(req.sampled_token_ids):
                    self._set_generated(rec, end + k - p0, token)
                    self._set_per_token(rec, rec.generated_ns, end + k - p0, header.time_ns, 0)
                for name, values in _sampled_features(req).items():
                    for k, value in enumerate(values):
                        self._set_per_token(rec, rec.features.setdefault(name, []),
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

    @staticmethod
    def _set_per_token(rec: RequestRecord, values: list, g: int, value: object,
                       fill: object) -> None:
        """``values[g] = value`` in one of the record's per-token lists (times, features),
        grown with ``fill`` as far as a plausible gap (``MAX_GAP``) and counted in its bytes."""
        if g < 0 or g - len(values) > MAX_GAP:
            return
        _mark_scores(rec, min(g, len(values)))
        if g >= len(values):
            rec.nbytes += 8 * (g + 1 - len(values))
            values.extend([fill] * (g + 1 - len(values)))
        values[g] = value

    def token_feature_inputs(
        self, header: StepHeader, positions_scored: np.ndarray, names: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token features for the rows of ``header`` about to be scored, before the step is
        ingested: ``(own, producer)``, each ``(len(positions_scored), len(names))`` float32.

        Row p scores token p as its own row and token p+1 as its producer. A token's
        features come from this step (tokens it sampled) or from the store (tokens sampled
        earlier); NaN where neither has them (a hook without features, a dropped step)."""
        n = len(positions_scored)
        own = np.full((n, len(names)), np.nan, dtype=np.float32)
        producer = np.full((n, len(names)), np.nan, dtype=np.float32)
        if not n or not names:
            return own, producer
        with self._cond:
            i = 0
            for req in header.requests:
                hi = req.row_offset + req.num_rows
                if i >= n or positions_scored[i] >= hi:
                    continue
                rec = self._records.get(req.req_id)
                stored = rec.features if rec is not None else {}
                fresh = _sampled_features(req)
                end = req.first_position + req.num_rows
                p0 = req.num_prompt_tokens

                def value(name: str, pos: int) -> float:
                    new = fresh.get(name)
                    if new is not None and 0 <= pos - end < len(new):
                        return new[pos - end]
                    old = stored.get(name)
                    g = pos - p0
                    return old[g] if old is not None and 0 <= g < len(old) else float("nan")

                while i < n and positions_scored[i] < hi:
                    pos = req.first_position + int(positions_scored[i]) - req.row_offset
                    for f, name in enumerate(names):
                        own[i, f] = value(name, pos)
                        producer[i, f] = value(name, pos + 1)
                    i += 1
        return own, producer

    @staticmethod
    def _set_prompt_tail(rec: RequestRecord, i: int, token: int) -> None:
        tail = rec.prompt_tail
        if len(tail) < PROMPT_TAIL:
            rec.nbytes += 8 * (PROMPT_TAIL - len(tail))
            tail.extend([-1] * (PROMPT_TAIL - len(tail)))
        if tail[i] != token:
            tail[i] = token
            rec.dirty_ids = 0

    @staticmethod
    def _set_generated(rec: RequestRecord, g: int, token: int) -> None:
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

    def engine_quiet_s(self, engine_id: str) -> float:
        """How long ``engine_id`` had run no step when it last sent a message, by its own
        clock (0 before its first step). Heartbeats come only once the hook's queue is
        empty and travel behind every step, so this never counts steps not read yet."""
        with self._cond:
            last_step = self._last_step_ns.get(engine_id)
            if last_step is None:
                return 0.0
            return max(0, self._engine_ns[engine_id] - last_step) / 1e9

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
            engine_now = self._engine_ns.get(engine_id, 0)
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
        for alias in request_aliases(req_id):
            ids = self._aliases.get(alias)
            if ids is not None and req_id in ids:
                ids.remove(req_id)
                if not ids:
                    del self._aliases[alias]

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
        for form in lookup_forms(request_id):
            ids = self._aliases.get(form)
            if ids:
                return ids
        return []

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


def _mark_scores(rec: RequestRecord, g: int) -> None:
    """Generated token ``g`` and those after it may score differently now (a row at
    position p scores token p and, as its producer, token p + 1)."""
    g = max(g, 0)
    rec.dirty_scores = g if rec.dirty_scores is None else min(rec.dirty_scores, g)


def stop_rule_nbytes(rule: StopRule) -> int:
    """Memory a stored stop rule holds, roughly: its strings plus per-string overhead."""
    return _ROW_OVERHEAD + sum(len(s.encode("utf-8")) + 56 for s in rule.strings)


def rows_to_score(header: StepHeader) -> np.ndarray:
    """Global row indices worth scoring: the last prompt row and every generated row.

    Prompt rows before the last one never score a generated token, so they are skipped
    before the matrix product rather than after it.
    """
    keep: list[np.ndarray] = []
    for req in header.requests:
        start = max(req.num_prompt_tokens - 1 - req.first_position, 0)
        if start < req.num_rows:
            keep.append(np.arange(req.row_offset + start, req.row_offset + req.num_rows))
    return np.concatenate(keep) if keep else np.empty(0, dtype=np.int64)


def _sampled_features(req: RequestRows) -> dict[str, list[float]]:
    """The token features a request's step carries, by feature name."""
    out = {}
    if req.sampled_logprobs is not None:
        out["logprob"] = req.sampled_logprobs
    if req.sampled_entropies is not None:
        out["entropy"] = req.sampled_entropies
    return out


def columns_for(names: Sequence[str], score_positions: Sequence[str],
                thresholds: Sequence[float], aggregations: Sequence[str] | None = None,
                verdicts: Sequence[tuple[VerdictModel, float] | None] | None = None
                ) -> ProbeColumns:
    return ProbeColumns(tuple(names), tuple(score_positions), tuple(float(t) for t in thresholds),
                        tuple(aggregations) if aggregations is not None else ("max",) * len(names),
                        tuple(verdicts) if verdicts is not None else (None,) * len(names))
