"""The gRPC server's threads: an open stream holds none (issue 24), and the worker pool's
threads end after a burst (issue 23, finding 7: the pool kept ~300 threads for ever after a
burst of streams)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from support import start_inprocess_sidecar, wait_until

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.sidecar.pool import ElasticThreadPool
from detector.sidecar.server import WORKERS


def test_pool_runs_everything_grows_to_the_burst_and_shrinks_back() -> None:
    pool = ElasticThreadPool(64, idle_s=0.2, thread_name_prefix="t")
    gate = threading.Event()
    running = []
    lock = threading.Lock()

    def task(i: int) -> int:
        with lock:
            running.append(i)
        gate.wait(30)
        return i * 2

    jobs = [pool.submit(task, i) for i in range(40)]
    wait_until(lambda: len(running) == 40, 60, 0.05)
    assert pool.live_threads == 40  # one per blocked call
    gate.set()
    assert [f.result(timeout=30) for f in jobs] == [i * 2 for i in range(40)]
    wait_until(lambda: pool.live_threads == 0, 60, 0.05, "the pool to shrink")  # none kept
    # Still usable, errors reach the caller, the cap queues the rest.
    assert pool.submit(lambda: 7).result(timeout=30) == 7
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(timeout=30)
    small = ElasticThreadPool(2, idle_s=5)
    gate2 = threading.Event()
    held = [small.submit(gate2.wait, 30) for _ in range(2)]
    queued = small.submit(lambda: "later")
    assert small.live_threads == 2 and not queued.done()
    gate2.set()
    assert queued.result(timeout=30) == "later" and all(f.result(timeout=30) for f in held)
    small.shutdown()
    with pytest.raises(RuntimeError):
        small.submit(lambda: None)


def test_open_streams_hold_no_thread_and_leave_none_behind(tmp_path) -> None:
    """A real gRPC server: 120 StreamScores calls waiting for requests that never come. The
    thread-per-call server held a thread for each (issue 24; before issue 23 it kept them
    for ever); on the asyncio server they hold none, and once the clients cancel, the slots
    are free and the process has the threads it had before the burst, no more."""
    sidecar = start_inprocess_sidecar(tmp_path, grpc_idle_thread_s=0.3, max_streams=200,
                                      stream_appear_wait_s=60.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}")
    stub = pb_grpc.DetectorStub(channel)
    stub.ListProbes(pb.ListProbesRequest(), timeout=30)  # the client's threads exist now
    baseline = threading.active_count()
    calls = [stub.StreamScores(pb.StreamScoresRequest(request_id=f"never-{i}"), timeout=60)
             for i in range(120)]
    try:
        wait_until(lambda: sidecar.service.open_calls == 120, 60, 0.05, "120 open streams")
        during = threading.active_count()
    finally:
        for call in calls:
            call.cancel()
    wait_until(lambda: sidecar.service.open_calls == 0, 30, 0.05, "the streams' slots back")
    wait_until(lambda: threading.active_count() <= baseline, 30, 0.05,
               "the process's threads back to their count before the burst")
    # No thread per stream: at most the handful of worker threads (none are needed here:
    # a stream waiting for its request does no work).
    assert during - baseline <= WORKERS, f"{during - baseline} threads for 120 streams"
    channel.close()
    sidecar.stop()


def test_executor_interface_is_what_grpc_uses() -> None:
    assert issubclass(ElasticThreadPool, futures.Executor)
