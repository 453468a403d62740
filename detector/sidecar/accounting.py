"""Finished-request accounting (metrics, OpenTelemetry events) off the scoring thread.

Judging a finished request reads its whole analysis; on the scoring thread that time was
taken from scoring the next steps (a lagging sidecar makes the hook drop steps). The
scoring thread only queues the request's id; a thread of its own does the accounting. The
queue is bounded: when it is full the scoring thread accounts itself, so nothing is lost and
memory stays bounded. A pipeline driven by hand (never started: tests, tools) accounts as it
goes, so what it counted is there when a call returns.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from detector.log_throttle import LogThrottle

logger = logging.getLogger(__name__)

QUEUE_SIZE = 4096


class FinishAccounting:
    def __init__(self, account: Callable[[str], None], *, maxsize: int = QUEUE_SIZE) -> None:
        self._account = account
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=maxsize)
        self._thread: threading.Thread | None = None
        self.inline = 0  # accounted on the caller's thread: the queue was full
        self._full_log = LogThrottle()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="finish-accounting",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Account what is queued, then end the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            logger.warning("finish accounting: queue still full at stop")
        thread.join(timeout=timeout_s)

    def submit(self, req_id: str) -> None:
        """Account ``req_id`` soon (now, without a started thread or with the queue full)."""
        if self._thread is None:
            self._safe(req_id)
            return
        try:
            self._queue.put_nowait(req_id)
        except queue.Full:
            self.inline += 1
            if self._full_log.ready():
                logger.warning("finish accounting is behind (%d queued): accounting on the "
                               "scoring thread (%d so far)", self._queue.qsize(), self.inline)
            self._safe(req_id)

    def drain(self) -> None:
        """Account everything queued now, on the caller's thread (tests, shutdown)."""
        while True:
            try:
                req_id = self._queue.get_nowait()
            except queue.Empty:
                return
            if req_id is not None:
                self._safe(req_id)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            req_id = self._queue.get()
            if req_id is None:
                return
            self._safe(req_id)

    def _safe(self, req_id: str) -> None:
        try:
            self._account(req_id)
        except Exception:  # one request's accounting must not end the others'
            logger.exception("failed to account finished request %s", req_id[:64])
