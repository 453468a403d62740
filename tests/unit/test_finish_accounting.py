"""Finished-request accounting runs off the scoring thread, in a bounded queue."""

from __future__ import annotations

import threading

from detector.sidecar.accounting import FinishAccounting


def test_accounting_runs_on_its_own_thread_in_order() -> None:
    seen: list[tuple[str, str]] = []
    accounting = FinishAccounting(lambda r: seen.append((r, threading.current_thread().name)))
    accounting.start()
    for i in range(20):
        accounting.submit(f"r{i}")
    accounting.stop()  # accounts what is queued first
    assert seen == [(f"r{i}", "finish-accounting") for i in range(20)]


def test_a_full_queue_accounts_on_the_callers_thread_and_loses_nothing() -> None:
    entered, release = threading.Event(), threading.Event()
    seen: list[tuple[str, str]] = []

    def account(req_id: str) -> None:
        if threading.current_thread().name == "finish-accounting":
            entered.set()
            release.wait(10)
        seen.append((req_id, threading.current_thread().name))

    accounting = FinishAccounting(account, maxsize=2)
    accounting.start()
    accounting.submit("a")
    assert entered.wait(10)  # the thread holds "a"
    for req_id in "bcde":
        accounting.submit(req_id)
    assert accounting.pending == 2 and accounting.inline == 2  # bounded: d, e went inline
    assert seen == [("d", "MainThread"), ("e", "MainThread")]
    release.set()
    accounting.stop()
    assert sorted(r for r, _ in seen) == list("abcde")


def test_a_pipeline_driven_by_hand_accounts_at_once() -> None:
    seen: list[str] = []
    accounting = FinishAccounting(seen.append)
    accounting.submit("r")
    assert seen == ["r"]


def test_a_failing_account_does_not_stop_the_others() -> None:
    seen: list[str] = []

    def account(req_id: str) -> None:
        if req_id == "bad":
            raise RuntimeError("boom")
        seen.append(req_id)

    accounting = FinishAccounting(account)
    accounting.start()
    for req_id in ("a", "bad", "b"):
        accounting.submit(req_id)
    accounting.stop()
    assert seen == ["a", "b"]
