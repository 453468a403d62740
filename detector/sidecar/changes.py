"""Store changes, reaching coroutines: how a waiting stream learns of a step without a thread.

The request store wakes threads with a condition variable. gRPC calls now run as
coroutines on one event loop (``detector.sidecar.server``), so a stream waiting for its
request's next step must not block on that condition: it would block the loop. Instead the
store's condition also calls listeners on every ``notify_all``; :class:`StoreChanges` is one,
and hands the wake-up to the loop (``call_soon_threadsafe``), where every waiting coroutine
re-checks what it waits for. A waiting stream holds a future and a timer, not a thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable


class ListenedCondition(threading.Condition):
    """A condition whose ``notify_all`` also calls listeners (with the lock held): threads
    and coroutines wait on the same changes."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[], None]] = []

    def notify_all(self) -> None:
        super().notify_all()
        for listener in self.listeners:
            listener()


class StoreChanges:
    """Wakes coroutines on the event loop given to :meth:`bind` when the store changes.

    Wake-ups are coalesced: however many changes land before the loop runs, it wakes the
    waiters once, and each re-checks its own condition (the store says *that* something
    changed, not what). A waiter is a bare future and a timer, no task: hundreds of streams
    woken on every engine step cost the loop little."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._pending = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake coroutines on ``loop`` from now on."""
        self._loop = loop

    def unbind(self) -> None:
        """Wake nothing any more (the loop is ending)."""
        self._loop = None

    def notify(self) -> None:
        """Any thread (the store's lock held): schedule one wake-up on the loop."""
        loop = self._loop
        if loop is None or self._pending:
            return
        self._pending = True
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: the server stopped, nobody waits
            self._pending = False

    def _wake(self) -> None:
        self._pending = False  # first: a change from now on schedules another wake-up
        for waiter in list(self._waiters):
            _resolve(waiter)

    async def wait_for(self, ready: Callable[[], bool], timeout_s: float) -> bool:
        """Until ``ready()`` (checked now and after each change) or ``timeout_s``; its last
        value. ``ready`` runs on the loop: it must not block (a store read with no wait)."""
        if self._loop is None:
            raise RuntimeError("StoreChanges.wait_for before bind()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        # Nothing runs on the loop between a check and the waiter's registration, so a
        # change after the check wakes this waiter.
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            woken: asyncio.Future[None] = loop.create_future()
            self._waiters.add(woken)
            timer = loop.call_later(remaining, _resolve, woken)
            try:
                await woken
            finally:
                timer.cancel()
                self._waiters.discard(woken)
        return True


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


__all__ = ["ListenedCondition", "StoreChanges"]
