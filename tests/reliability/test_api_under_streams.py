"""Streams never starve the API, without vLLM.

The sync gRPC server tied a thread to each call. With 16 threads, 16 open streams used to
stop everything else: health checks timed out (Kubernetes would restart the sidecar and
lose its results) and so did GetScores. Calls are now coroutines on the asyncio server
(``detector.sidecar.server``): open streams and waits hold no thread, and each kind stays
capped at ``max_streams``.
"""

from __future__ import annotations


import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, wait_until
from tiny_engine import probe, schedule, single_request

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.sidecar.app import Sidecar, SidecarSettings

HOLDERS = 40  # streams and waits on requests that never come, well past the old 16 threads




@pytest.fixture
def sidecar(tmp_path):
    probe_path = probe("p", [1, 3], "producer", 1).save(tmp_path / "p")
    sc = Sidecar(SidecarSettings(channel=f"ipc://{tmp_path}/ch.sock",
                                 grpc_address=f"127.0.0.1:{free_port()}", metrics_port=None,
                                 probes=[probe_path], shutdown_grace_s=0, max_streams=64))
    sc.start()
    for message in schedule():  # requests "A" and "B", finished
        sc.pipeline.handle(message)
    yield sc
    sc.stop()


def test_health_and_reads_answer_while_streams_and_waits_are_open(sidecar) -> None:
    with grpc.insecure_channel(sidecar.settings.grpc_address) as ch:
        stub = pb_grpc.DetectorStub(ch)
        holders = [stub.StreamScores(pb.StreamScoresRequest(request_id=f"never-{i}"),
                                     timeout=120) for i in range(HOLDERS // 2)]
        waits = [stub.GetScores.future(pb.GetScoresRequest(request_id=f"later-{i}",
                                                            wait_until_finished=True),
                                       timeout=120) for i in range(HOLDERS // 2)]
        try:
            # Each holder is in the server's hands once its slot is counted.
            wait_until(lambda: sidecar.service.open_calls >= HOLDERS, 20, 0.05)
            assert sidecar.service.open_calls == HOLDERS
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "liedetector.v1.Detector"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reply = stub.GetScores(pb.GetScoresRequest(request_id="A"), timeout=10)
            assert reply.state == pb.REQUEST_STATE_FINISHED and reply.tokens
            assert len(stub.ListProbes(pb.ListProbesRequest(), timeout=10).probes) == 1
        finally:
            for h in holders:
                h.cancel()
            for w in waits:
                w.cancel()


def test_streams_past_the_cap_are_refused_and_waits_have_their_own(sidecar) -> None:
    with grpc.insecure_channel(sidecar.settings.grpc_address) as ch:
        stub = pb_grpc.DetectorStub(ch)
        cap = sidecar.service.max_streams
        holders = [stub.StreamScores(pb.StreamScoresRequest(request_id=f"never-{i}"),
                                     timeout=120) for i in range(cap)]
        try:
            wait_until(lambda: sidecar.service.open_calls >= cap, 20, 0.05)
            assert sidecar.service.open_calls == cap
            with pytest.raises(grpc.RpcError) as err:
                list(stub.StreamScores(pb.StreamScoresRequest(request_id="one-more"),
                                       timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "open streams" in err.value.details()
            # A wait is not a stream: it still gets a slot of its own.
            reply = stub.GetScores(pb.GetScoresRequest(request_id="A", wait_until_finished=True),
                                   timeout=10)
            assert reply.state == pb.REQUEST_STATE_FINISHED
        finally:
            for h in holders:
                h.cancel()


STALLED_TOKENS = 3000


def test_a_stalled_consumer_gets_each_token_once_and_holds_no_more(sidecar) -> None:
    """A client that stops reading while its request generates 3,000 tokens: updates are
    built only as gRPC takes them and carry only what was not yet sent, so what the stream
    holds for it is its request's results, once (not an update queued per step). When it
    reads again, every token arrives once, in order."""
    generated = [10 + i % 90 for i in range(STALLED_TOKENS)]
    steps = single_request("S", [5, 6, 7], generated, seq0=len(schedule()))
    with grpc.insecure_channel(sidecar.settings.grpc_address) as ch:
        stub = pb_grpc.DetectorStub(ch)
        call = stub.StreamScores(pb.StreamScoresRequest(request_id="S"), timeout=300)
        sidecar.pipeline.handle(steps[0])
        updates = [next(call)]
        for step in steps[1:]:  # the client reads nothing meanwhile
            sidecar.pipeline.handle(step)
        updates += list(call)
        whole = stub.GetScores(pb.GetScoresRequest(request_id="S"), timeout=30)
    assert updates[-1].final and whole.state == pb.REQUEST_STATE_FINISHED
    streamed = [t for u in updates for t in u.tokens]
    assert [t.token_id for t in streamed] == generated
    assert [t.index for t in streamed] == list(range(STALLED_TOKENS))
    sent = sum(u.ByteSize() for u in updates)
    assert sent <= 1.5 * whole.ByteSize(), (sent, whole.ByteSize(), len(updates))
