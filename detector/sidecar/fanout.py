"""Stream updates computed together: one worker call per engine step, not one per stream.

Every watched stream wakes on the same store change (``detector.sidecar.changes``). Each
used to hand its update to a worker thread on its own and be handed back: with 256 streams
that is 512 thread hand-offs per engine step, each of which must win the GIL and a core
from a vLLM engine that keeps both busy. The measured cost (``benchmarks.watchers``) was
more in those hand-offs than in the updates themselves. Here the streams woken in one turn
of the event loop queue their update functions, and the next turn runs them all in one
worker call; the results go back to the loop in one hand-off.

An update function that raises (a stream whose request expired aborts its call) raises in
its own stream only: each function's outcome is kept apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

# Updates in one worker call, at most: a larger batch is split, so that one call never
# holds a worker (and the results of the first streams) for the whole fan-out.
MAX_BATCH = 64


class UpdateBatcher:
    """Runs the functions coroutines ``submit`` in one turn of the loop as one batch, on
    ``offload`` (an awaitable runner of a plain function, e.g. a worker pool's)."""

    def __init__(self, offload: Callable[..., Awaitable[Any]], *,
                 max_batch: int = MAX_BATCH) -> None:
        self._offload = offload
        self.max_batch = max_batch
        self._pending: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # How many batches ran and how many functions they held (for tests and benchmarks).
        self.batches = 0
        self.calls = 0

    async def submit(self, fn: Callable[[], Any]) -> Any:
        """``fn()``'s value (or exception), computed in a batch with the other functions
        submitted in this turn of the loop."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Any] = loop.create_future()
        self._pending.append((fn, result))
        if not self._scheduled:
            # Streams woken by one change resume in the same turn; the flush runs in the
            # next, after all of them have queued.
            self._scheduled = True
            loop.call_soon(self._flush)
        return await result

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self.max_batch):
            task = asyncio.get_running_loop().create_task(
                self._run(pending[start:start + self.max_batch]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]]) -> None:
        live = [(fn, fut) for fn, fut in batch if not fut.done()]  # callers gone: skipped
        if not live:
            return
        self.batches += 1
        self.calls += len(live)
        try:
            outcomes = await self._offload(_call_each, [fn for fn, _ in live])
        except BaseException as exc:  # the runner itself failed: every caller hears of it
            outcomes = [(False, exc)] * len(live)
        for (_, fut), (ok, value) in zip(live, outcomes):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)


def _call_each(fns: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
    """Each function's (True, value) or (False, exception), one not stopping the next."""
    out: list[tuple[bool, Any]] = []
    for fn in fns:
        try:
            out.append((True, fn()))
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's own coroutine
            out.append((False, exc))
    return out


__all__ = ["MAX_BATCH", "UpdateBatcher"]
