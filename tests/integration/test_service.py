"""The gRPC API as the serving stack sees it: stubs, a reflection-only client, every error
status, hot reload of probes under load, streaming spans and the metrics that move."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from support import complete, complete_many, scrape_metrics, start_sidecar, wait_for_engine

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.serving.client import DetectorClient, RequestState
from detector.sidecar.service import MAX_ID_LENGTH

pytestmark = pytest.mark.vllm

ADMIN_TOKEN = "test-admin-token"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


@pytest.fixture(scope="module")
def sidecar(vllm_server, probe_dir, model_dir, tmp_path_factory):
    proc = start_sidecar(vllm_server.channel, tmp_path_factory.mktemp("service"),
                         probes=[probe_dir], model_dir=model_dir,
                         env={"LIE_DETECTOR_MAX_STREAMS": "2",
                              "LIE_DETECTOR_ADMIN_TOKEN": ADMIN_TOKEN},
                         # LoadProbe of the probes tests write in their own tmp folders
                         probe_roots=[tmp_path_factory.getbasetemp()])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def channel(sidecar):
    with grpc.insecure_channel(sidecar.grpc_address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    """The raw stub, for the tests of the wire itself (statuses of malformed requests,
    reflection, stream slots); product behaviour is read through ``client``."""
    return pb_grpc.DetectorStub(channel)


@pytest.fixture(scope="module")
def client(sidecar):
    with DetectorClient(sidecar.grpc_address) as c:
        yield c


@pytest.fixture(scope="module")
def admin(sidecar):
    with DetectorClient(sidecar.grpc_address, admin_token=ADMIN_TOKEN) as c:
        yield c


def test_reflection_only_client_can_list_and_call(channel, vllm_server, client) -> None:
    """A client that knows nothing of this project discovers and calls the service."""
    wait_for_engine(client)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert "liedetector.v1.Detector" in services
    assert "grpc.health.v1.Health" in services
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("liedetector.v1.Detector")
    method = service.methods_by_name["GetScores"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    reply_cls = message_factory.GetMessageClass(method.output_type)
    resp = complete(vllm_server.base_url, "The moon orbits the", max_tokens=8,
                    request_id="reflect-1")
    call = channel.unary_unary("/liedetector.v1.Detector/GetScores",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=reply_cls.FromString)
    reply = call(request_cls(request_id="reflect-1", wait_until_finished=True), timeout=30)
    assert [t.token_id for t in reply.tokens] == resp["choices"][0]["token_ids"]
    assert reply.text == resp["choices"][0]["text"]


def test_error_statuses(stub, tmp_path, probe_dir) -> None:
    def code(call, request, **kw):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=kw.get("timeout", 10), metadata=kw.get("metadata", ADMIN))
        assert err.value.details(), "every error carries a readable message"
        return err.value.code(), err.value.details()

    assert code(stub.GetScores, pb.GetScoresRequest(request_id="nope"))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert code(stub.GetScores, pb.GetScoresRequest(request_id=""))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    # A long id is looked up (in the hook's bounded form); past the bound it is refused.
    assert code(stub.GetScores, pb.GetScoresRequest(request_id="x" * 600))[0] == \
        grpc.StatusCode.NOT_FOUND
    assert code(stub.GetScores, pb.GetScoresRequest(request_id="x" * (MAX_ID_LENGTH + 1)))[0] \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code(stub.LoadProbe, pb.LoadProbeRequest(path=""))[0] == \
        grpc.StatusCode.INVALID_ARGUMENT
    # Admin calls need the token.
    assert code(stub.LoadProbe, pb.LoadProbeRequest(path=str(probe_dir)), metadata=())[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    assert code(stub.UnloadProbe, pb.UnloadProbeRequest(name="word-start"),
                metadata=(("authorization", "Bearer wrong"),))[0] == \
        grpc.StatusCode.PERMISSION_DENIED
    assert code(stub.UnloadProbe, pb.UnloadProbeRequest(name="never-loaded"))[0] == \
        grpc.StatusCode.NOT_FOUND
    # A corrupt artifact is refused with the reason; the server keeps serving.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(probe_dir, corrupt)
    (corrupt / "probe.safetensors").write_bytes(b"\x00garbage")
    status, details = code(stub.LoadProbe, pb.LoadProbeRequest(path=str(corrupt)))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in details
    # A probe trained for another model (other fingerprint) does not fit.
    other = tmp_path / "other-model"
    shutil.copytree(probe_dir, other)
    meta = json.loads((other / "probe.json").read_text())
    meta["name"] = "other-model"
    meta["model"]["fingerprint"] = "0" * 16
    (other / "probe.json").write_text(json.dumps(meta))
    status, details = code(stub.LoadProbe, pb.LoadProbeRequest(path=str(other)))
    assert status == grpc.StatusCode.FAILED_PRECONDITION and "fingerprint" in details
    # The same name twice.
    status, _ = code(stub.LoadProbe, pb.LoadProbeRequest(path=str(probe_dir)))
    assert status == grpc.StatusCode.ALREADY_EXISTS
    # The deadline bounds a wait for a request that never comes.
    started = time.monotonic()
    status, _ = code(stub.GetScores, pb.GetScoresRequest(request_id="never",
                                                         wait_until_finished=True), timeout=1.5)
    assert status in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 3
    assert len(stub.ListProbes(pb.ListProbesRequest()).probes) == 1


def test_stream_limit_gives_resource_exhausted(stub) -> None:
    """Two streams waiting on unknown ids hold both slots; the third is refused."""
    holders = [stub.StreamScores(pb.StreamScoresRequest(request_id=f"hold-{i}"), timeout=8)
               for i in range(2)]
    results: list = []

    def drain(it) -> None:
        try:
            results.extend(list(it))
        except grpc.RpcError as exc:
            results.append(exc.code())

    threads = [threading.Thread(target=drain, args=(h,)) for h in holders]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamScores(pb.StreamScoresRequest(request_id="third"), timeout=5))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for h in holders:
        h.cancel()
    for t in threads:
        t.join(timeout=10)


def test_hot_reload_while_requests_run(vllm_server, client, admin, probe_dir,
                                       tmp_path) -> None:
    wait_for_engine(client)
    second = tmp_path / "word-start-b"
    shutil.copytree(probe_dir, second)
    meta = json.loads((second / "probe.json").read_text())
    meta["name"] = "word-start-b"
    (second / "probe.json").write_text(json.dumps(meta))

    jobs = [{"prompt": f"Count slowly from {i}:", "max_tokens": 48, "request_id": f"reload-{i}",
             "ignore_eos": True} for i in range(4)]
    done = threading.Event()
    responses: list = []

    def run() -> None:
        responses.extend(complete_many(vllm_server.base_url, jobs))
        done.set()

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.5)
    info = admin.load_probe(second)
    assert info.name == "word-start-b" and info.active
    worker.join()
    assert len(responses) == 4  # vLLM never noticed
    after = complete(vllm_server.base_url, "The sun rises in the", max_tokens=8,
                     request_id="reload-after")
    reply = client.get_scores("reload-after", wait_until_finished=True, timeout=30)
    assert reply.probes == ("word-start", "word-start-b")
    assert [t.token_id for t in reply.tokens] == after["choices"][0]["token_ids"]
    for t in reply.tokens:
        a, b = (s.probability for s in t.scores)
        assert a == pytest.approx(b)  # the same weights under two names
    assert {s.probe for s in reply.spans} == {"word-start", "word-start-b"}
    # In-flight requests keep every score they had; tokens scored before the load lack
    # only the new probe.
    for job in jobs:
        r = client.get_scores(job["request_id"])
        assert all(any(s.probe == "word-start" for s in t.scores) for t in r.tokens)
    assert admin.unload_probe("word-start-b")
    names = [p.name for p in client.list_probes().probes]
    assert names == ["word-start"]


def test_stream_sends_spans_and_metrics_move(vllm_server, client, sidecar) -> None:
    wait_for_engine(client)
    before = scrape_metrics(sidecar.metrics_port)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(resp=complete(
        vllm_server.base_url, "Tell me about Paris and London.", max_tokens=60,
        request_id="spans-1", ignore_eos=True)))
    worker.start()
    spans, tokens, final = [], [], None
    for update in client.stream_scores("spans-1", timeout=120):
        spans.extend(update.spans)
        tokens.extend(update.tokens)
        final = update
    worker.join()
    text = result["resp"]["choices"][0]["text"]
    assert final.final and final.state is RequestState.FINISHED
    assert "".join(t.text for t in tokens) == text
    assert [t.index for t in tokens] == list(range(len(tokens)))
    keys = [(s.kind, s.char_start, s.char_end, s.probe) for s in spans]
    assert len(keys) == len(set(keys)), "a span was sent twice"
    assert {s.kind for s in spans} == {"claim", "sentence"}
    for s in spans:
        assert text[s.char_start:s.char_end] == s.text
    # The response verdict comes with the final update and derives from the claims alone.
    claims = [s for s in spans if s.kind == "claim"]
    (verdict,) = final.verdicts
    assert verdict.probe == "word-start" and verdict.claims == len(claims)
    assert verdict.flagged_claims == sum(s.flagged for s in claims)
    assert verdict.flagged == any(s.flagged for s in claims)
    assert abs(verdict.score - max(s.score for s in claims)) < 1e-6
    for sentence in (s for s in spans if s.kind == "sentence"):
        inside = [c for c in claims
                  if sentence.char_start <= c.char_start and c.char_end <= sentence.char_end]
        assert inside and sentence.flagged == any(c.flagged for c in inside)
    time.sleep(1.5)  # housekeeping publishes gauges once a second
    after = scrape_metrics(sidecar.metrics_port)
    probe = '{"probe": "word-start"}'
    assert after["lie_detector_tokens_scored_total" + probe] >= \
        before.get("lie_detector_tokens_scored_total" + probe, 0) + 60
    assert after["lie_detector_requests_scored_total" + probe] > \
        before.get("lie_detector_requests_scored_total" + probe, 0)
    span_key = 'lie_detector_spans_scored_total{"kind": "sentence", "probe": "word-start"}'
    assert after[span_key] > before.get(span_key, 0)
    assert after["lie_detector_span_score_count" + probe] > \
        before.get("lie_detector_span_score_count" + probe, 0)
    assert after["lie_detector_steps_received_total"] > before["lie_detector_steps_received_total"]
    assert after["lie_detector_hook_connected"] == 1
    assert after["lie_detector_probe_load_failures_total"] >= 2  # from test_error_statuses


def test_health_reports_serving(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "liedetector.v1.Detector"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_reused_request_id_reads_the_newest_request_and_says_so(vllm_server, client) -> None:
    """Issue 13, finding 1: the same X-Request-Id sent twice used to return the first
    request's text and scores, even by the second's own response id."""
    wait_for_engine(client)
    first = complete(vllm_server.base_url, "The capital of France is", max_tokens=6,
                     request_id="reused-id", ignore_eos=True)
    one = client.get_scores("reused-id", wait_until_finished=True, timeout=60)
    second = complete(vllm_server.base_url, "Two plus two equals", max_tokens=6,
                      request_id="reused-id", ignore_eos=True)
    for asked in ("reused-id", second["id"]):
        reply = client.get_scores(asked, wait_until_finished=True, timeout=60)
        assert reply.text == second["choices"][0]["text"], asked
        assert [t.token_id for t in reply.tokens] == second["choices"][0]["token_ids"], asked
        assert reply.requests_with_id == 2, asked
        assert reply.engine_request_id != one.engine_request_id
    # The engine id is unique: the first request can still be read by it.
    again = client.get_scores(one.engine_request_id, timeout=30)
    assert again.text == first["choices"][0]["text"] and again.requests_with_id == 1
