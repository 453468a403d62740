"""A thread pool that gives its threads back: the gRPC server's workers.

gRPC calls run as coroutines (``detector.sidecar.server``); their CPU work (re-judging an
answer) and blocking reads (loading a probe) run here. ``concurrent.futures.ThreadPoolExecutor``
never ends a thread it started (when the sync server ran on one, a burst of 300 streams left
300 idle threads for ever). Here a thread that has had nothing to do for ``idle_s`` ends,
down to none; the next piece of work starts one again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any


class ElasticThreadPool(futures.Executor):
    """At most ``max_workers`` threads, started on demand, each ending after ``idle_s``
    without work."""

    def __init__(self, max_workers: int, *, idle_s: float = 30.0,
                 thread_name_prefix: str = "pool") -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if not idle_s > 0:
            raise ValueError(f"idle_s must be positive, got {idle_s}")
        self.max_workers = max_workers
        self.idle_s = idle_s
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # One token per worker waiting for work that no submitted item has claimed yet.
        self._idle = 0
        self._live = 0
        self._started = 0
        self._shutdown = False

    @property
    def live_threads(self) -> int:
        with self._lock:
            return self._live

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.put((future, fn, args, kwargs))
            if self._idle:  # a waiting worker will take it
                self._idle -= 1
            elif self._live < self.max_workers:
                self._live += 1
                self._started += 1
                threading.Thread(target=self._work, name=f"{self._prefix}_{self._started}",
                                 daemon=True).start()
            # else: queued until a worker is free (the server's bound on concurrent calls)
        return future

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    # Leave only if no item is waiting and this worker's idle token is
                    # still unclaimed (a claimed one means an item is on its way to us).
                    if self._queue.empty() and self._idle:
                        self._idle -= 1
                        self._live -= 1
                        return
                continue
            if item is None:  # shutdown
                with self._lock:
                    self._live -= 1
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as exc:  # handed to whoever waits on the future
                    future.set_exception(exc)
            del item, future, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            live = self._live
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in range(live):
            self._queue.put(None)
        # Threads are daemons; ``wait`` only matters for callers that join, which gRPC
        # does not: nothing here blocks on them.


__all__ = ["ElasticThreadPool"]
