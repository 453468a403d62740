"""Collect the rows of chosen requests from the plugin's channel, as the sidecar sees them.

The collector binds the channel with the sidecar's own :class:`ChannelSubscriber` (same
decoding, same rejection of malformed messages) and keeps, for each request it was told
to expect, the rows from one position onwards (by default the last prompt row, which
produces the first generated token), converted to float16. Its receiving thread does
little else, so it keeps up with the engine; if the plugin still drops a step, the gap
shows as missing positions and the capture retries that request.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field

import torch

from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import CaptureStatus, EngineInfo, StepHeader

logger = logging.getLogger(__name__)

# Engine ids of /v1/completions requests: cmpl-{X-Request-Id}-{prompt index}-{8 chars}.
_ENGINE_ID = re.compile(r"^cmpl-(?P<key>.+)-\d+-[0-9A-Za-z]{8}$")


def request_key(engine_id: str) -> str | None:
    """The ``X-Request-Id`` a completions request was sent with, from its engine id."""
    m = _ENGINE_ID.match(engine_id)
    return m.group("key") if m else None


class CaptureOffError(RuntimeError):
    """The plugin in vLLM switched capture off; the message is its one-line reason."""


@dataclass
class CollectedRequest:
    keep_from: int | None
    num_prompt_tokens: int = 0
    chunks: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (first pos, (L,n,H))
    tokens: dict[int, int] = field(default_factory=dict)
    finished: bool = False

    def positions(self) -> set[int]:
        return set(self.tokens)

    def rows(self, first: int, last: int) -> torch.Tensor | None:
        """Rows of positions ``first..last`` inclusive as (n, L, H), or None if any is missing."""
        where: dict[int, tuple[int, int]] = {}
        for ci, (start, chunk) in enumerate(self.chunks):
            for j in range(chunk.shape[1]):
                where[start + j] = (ci, j)  # later chunks (recomputation) win
        if any(p not in where for p in range(first, last + 1)):
            return None
        return torch.stack([self.chunks[where[p][0]][1][:, where[p][1]]
                            for p in range(first, last + 1)])


class RowCollector:
    """Receives steps on ``endpoint`` and keeps the rows of expected requests."""

    def __init__(self, endpoint: str, *, dtype: torch.dtype = torch.float16) -> None:
        self.subscriber = ChannelSubscriber(endpoint)
        self.dtype = dtype
        self.engine: EngineInfo | None = None
        # Set when the plugin says capture is off (it does so in place of heartbeats).
        self.capture_off: CaptureStatus | None = None
        self.messages = 0
        self.dropped_total = 0
        self.rows_kept = 0
        self._requests: dict[str, CollectedRequest] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="row-collector", daemon=True)
        self._thread.start()

    # --- receiving

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.subscriber.recv(timeout_s=0.2)
            if message is None:
                continue
            header, rows = message
            with self._cond:
                self.messages += 1
                if isinstance(header, CaptureStatus):
                    if not header.enabled:
                        self.capture_off = header
                    self._cond.notify_all()
                    continue
                self.capture_off = None
                self.engine = header.engine
                self.dropped_total = header.dropped_total
                if isinstance(header, StepHeader):
                    self._take(header, rows)
                self._cond.notify_all()

    def _take(self, header: StepHeader, rows: torch.Tensor) -> None:
        for req in header.requests:
            key = request_key(req.req_id)
            entry = self._requests.get(key) if key is not None else None
            if entry is None or req.num_rows == 0:
                continue
            entry.num_prompt_tokens = req.num_prompt_tokens
            keep_from = entry.keep_from
            if keep_from is None:
                keep_from = max(0, req.num_prompt_tokens - 1)
            skip = max(0, keep_from - req.first_position)
            if skip >= req.num_rows:
                continue
            start = req.row_offset + skip
            chunk = rows[:, start:req.row_offset + req.num_rows].to(self.dtype, copy=True)
            first = req.first_position + skip
            entry.chunks.append((first, chunk))
            for j, tok in enumerate(req.input_token_ids[skip:]):
                entry.tokens[first + j] = tok
            self.rows_kept += chunk.shape[1]
        for engine_id in header.finished:
            key = request_key(engine_id)
            if key in self._requests:
                self._requests[key].finished = True

    # --- API for the capture loop

    def expect(self, key: str, *, keep_from: int | None = None) -> None:
        """Start keeping rows of the request sent with ``X-Request-Id: key``.

        ``keep_from``: first position to keep; default the last prompt row.
        """
        with self._cond:
            self._requests[key] = CollectedRequest(keep_from=keep_from)

    def wait_rows(self, key: str, first: int, last: int, timeout_s: float) -> torch.Tensor | None:
        """Rows of positions ``first..last`` (n, L, H) once all arrived; None on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                entry = self._requests.get(key)
                if entry is not None and all(p in entry.tokens for p in range(first, last + 1)):
                    return entry.rows(first, last)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(timeout=min(remaining, 0.5))

    def get(self, key: str) -> CollectedRequest | None:
        with self._cond:
            return self._requests.get(key)

    def forget(self, key: str) -> None:
        with self._cond:
            self._requests.pop(key, None)

    def wait_connected(self, timeout_s: float = 60.0) -> EngineInfo:
        """Block until the engine's hook has sent anything (a heartbeat at the latest);
        ``CaptureOffError`` as soon as it says capture is off instead."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.engine is None:
                if self.capture_off is not None:
                    raise CaptureOffError(self.capture_off.summary())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no message from the plugin on {self.subscriber.endpoint} within "
                        f"{timeout_s:.0f} s: is vLLM running with LIE_DETECTOR_CHANNEL set to it?"
                    )
                self._cond.wait(timeout=min(remaining, 0.5))
            return self.engine

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.subscriber.close()

    def __enter__(self) -> RowCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["CaptureOffError", "CollectedRequest", "RowCollector", "request_key"]
