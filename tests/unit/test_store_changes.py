"""Store changes reach coroutines without a thread each (issue 24): the bridge from the
store's condition variable to the gRPC server's event loop."""

from __future__ import annotations

import asyncio
import threading

from detector.sidecar.changes import ListenedCondition, StoreChanges
from detector.sidecar.records import RequestRecord
from detector.sidecar.store import RequestStore


def test_condition_calls_listeners_on_every_notify_all() -> None:
    cond = ListenedCondition()
    heard: list[int] = []
    cond.listeners.append(lambda: heard.append(1))
    with cond:
        cond.notify_all()
        cond.notify_all()
    assert heard == [1, 1]


def test_a_change_from_another_thread_wakes_a_waiting_coroutine() -> None:
    """A waiter checks, then waits; a change made by a thread after the check wakes it (a
    lost wake-up would leave it waiting out its 60 s and return False)."""
    store = RequestStore()
    changes = StoreChanges()
    store.on_change(changes.notify)
    flag = {"set": False}

    def change() -> None:
        with store._cond:  # what the scoring thread does: change, then notify_all
            flag["set"] = True
            store._cond.notify_all()

    async def main() -> tuple[bool, bool, bool]:
        changes.bind(asyncio.get_running_loop())
        nothing = await changes.wait_for(lambda: False, 0.0)  # no wait at all
        checked = asyncio.Event()

        def ready() -> bool:
            checked.set()
            return flag["set"]

        waiter = asyncio.ensure_future(changes.wait_for(ready, 60.0))
        await checked.wait()  # the waiter has checked once and is waiting now
        await asyncio.to_thread(change)
        woken = await waiter
        # Many changes before the loop runs wake waiters once; nothing is left waiting.
        for _ in range(100):
            changes.notify()
        await asyncio.sleep(0)
        return nothing, woken, not changes._waiters

    nothing, woken, none_left = asyncio.run(main())
    assert nothing is False
    assert woken is True
    assert none_left


def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    changes = StoreChanges()

    async def main() -> int:
        changes.bind(asyncio.get_running_loop())
        waiter = asyncio.ensure_future(changes.wait_for(lambda: False, 60.0))
        await asyncio.sleep(0)
        assert len(changes._waiters) == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        return len(changes._waiters)

    assert asyncio.run(main()) == 0


def test_notify_after_the_loop_ended_is_harmless() -> None:
    changes = StoreChanges()
    loop = asyncio.new_event_loop()
    changes.bind(loop)
    loop.close()
    changes.notify()  # the scoring thread may step once more while the server stops
    changes.unbind()
    changes.notify()


def test_moved_on_reads_a_record_without_the_lock() -> None:
    """The loop's check: a record changed, ended or gone has moved on; one the scoring thread
    holds the lock over is still read (the loop never waits for it)."""
    store = RequestStore()
    assert store.moved_on("never", 0)  # gone (or never there): the stream's next read says
    with store._cond:
        store._records["r"] = RequestRecord("r", "e", 4, version=3)
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store._cond:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(30)
        assert not store.moved_on("r", 3)
        assert store.moved_on("r", 2)
        store._records["r"].finished = True
        assert store.moved_on("r", 3)
    finally:
        release.set()
        holder.join(30)
