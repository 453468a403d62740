"""Each engine's step sequence and clock, as its messages tell them: gaps, replays, quiet.

Steps carry a sequence number and the engine's ``time_ns``. A step at or below the newest
one recorded is a replay or arrived out of order (refused); a jump in the sequence is steps
the hook dropped (a gap: requests running then are incomplete); a new engine id is a
restarted engine. Quiet and idle are judged on the engine's clock, never on the sidecar's,
so a sidecar that was stalled itself (SIGSTOP, starved of CPU) cannot take its own unread
backlog for an engine gone quiet. Not thread-safe: the store calls it under its lock.
"""

from __future__ import annotations

import logging

from detector.log_throttle import LogThrottle

logger = logging.getLogger(__name__)

RESTARTED = "the vLLM engine restarted"
DROPPED = "the channel dropped steps"


class EngineClock:
    """What the store knows of the engines' sequences and clocks. Methods that take a
    message return ``(engine id, reason)`` for each engine whose running requests are now
    incomplete, in the order they were found."""

    def __init__(self) -> None:
        self._last_seq: dict[str, int] = {}
        # Highest step seq recorded per engine (heartbeats do not move it): a step at or
        # below it is a replay or arrived out of order, and is refused.
        self._max_step_seq: dict[str, int] = {}
        # The engine's clock per engine: the newest message and the newest step.
        self._engine_ns: dict[str, int] = {}
        self._last_step_ns: dict[str, int] = {}
        self.engine_id: str | None = None
        self.stale = 0
        self.gaps = 0
        self._gap_log = LogThrottle()

    def heartbeat(self, engine_id: str, next_seq: int | None = None,
                  time_ns: int | None = None) -> list[tuple[str, str]]:
        """A heartbeat from ``engine_id`` (sent at ``time_ns``, engine clock): detect
        restarts and silent drops."""
        marks: list[tuple[str, str]] = []
        if time_ns is not None:
            self._engine_ns[engine_id] = max(self._engine_ns.get(engine_id, 0), time_ns)
        if self.engine_id is not None and engine_id != self.engine_id:
            marks.append((self.engine_id, RESTARTED))
        self.engine_id = engine_id
        if next_seq is not None:
            last = self._last_seq.get(engine_id)
            if last is not None and next_seq - 1 > last:
                self._note_gap(engine_id, last + 1, next_seq - 1)
                marks.append((engine_id, DROPPED))
                self._last_seq[engine_id] = next_seq - 1
        return marks

    def step(self, engine_id: str, seq: int, time_ns: int) -> list[tuple[str, str]] | None:
        """A step: None (and counted stale) when it is a replay or out of order, else the
        incomplete marks its arrival implies."""
        if seq <= self._max_step_seq.get(engine_id, -1):
            self.stale += 1
            return None
        self._max_step_seq[engine_id] = seq
        self._engine_ns[engine_id] = max(self._engine_ns.get(engine_id, 0), time_ns)
        self._last_step_ns[engine_id] = max(self._last_step_ns.get(engine_id, 0), time_ns)
        marks: list[tuple[str, str]] = []
        if self.engine_id is not None and engine_id != self.engine_id:
            marks.append((self.engine_id, RESTARTED))
        self.engine_id = engine_id
        last = self._last_seq.get(engine_id)
        if last is not None and seq > last + 1:
            self._note_gap(engine_id, last + 1, seq - 1)
            marks.append((engine_id, DROPPED))
        self._last_seq[engine_id] = max(seq, last if last is not None else -1)
        return marks

    def _note_gap(self, engine_id: str, first: int, last: int) -> None:
        """Steps that never arrived: counted, and logged at most every 5 s."""
        self.gaps += 1
        if self._gap_log.ready():
            logger.warning("channel: steps %d..%d of engine %s never arrived (the hook dropped "
                           "them; %d gaps so far); requests running are marked incomplete",
                           first, last, engine_id[:8], self.gaps)

    def is_stale(self, engine_id: str, seq: int) -> bool:
        """A step already recorded, or one older than a step recorded (out of order)."""
        return seq <= self._max_step_seq.get(engine_id, -1)

    def now_ns(self, engine_id: str) -> int:
        """The engine's clock at its newest message (0 before any)."""
        return self._engine_ns.get(engine_id, 0)

    def quiet_s(self, engine_id: str) -> float:
        """How long ``engine_id`` had run no step when it last sent a message, by its own
        clock (0 before its first step)."""
        last_step = self._last_step_ns.get(engine_id)
        if last_step is None:
            return 0.0
        return max(0, self._engine_ns[engine_id] - last_step) / 1e9


__all__ = ["DROPPED", "RESTARTED", "EngineClock"]
