"""A real sidecar exports one OpenTelemetry ``gen_ai.evaluation.result`` event per finished
request per probe to a real OTLP/gRPC receiver, with GetScores' values and no text.

The receiver is opentelemetry-proto's ``LogsService`` served by grpcio on a free loopback
port in this process; the sidecar finds it only through the standard ``OTEL_*`` variables.
The sidecars here bind the shared vLLM server's channel one at a time and are stopped at
the end of the module.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent import futures

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import text_format
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from support import _served_model, complete, start_sidecar, synthetic_probe, wait_until

from detector.serving.client import DetectorClient, RequestState

pytestmark = pytest.mark.vllm

EVENT = "gen_ai.evaluation.result"
SERVICE = "lie-detector-otel-test"
PROMPTS = [
    ("otel-req-1", "The capital city of Portugal is", 14),
    ("otel-req-2", "The chemical element with the symbol Fe is called", 12),
    ("otel-req-3", "The highest mountain in the Alps is named", 16),
]
CHAT = ("otel-req-4", "Name the author of the novel Moby-Dick in one sentence.", 20)


class Receiver(logs_service_pb2_grpc.LogsServiceServicer):
    """An OTLP/gRPC logs endpoint that keeps every export request it is sent."""

    def __init__(self) -> None:
        self.requests: list[logs_service_pb2.ExportLogsServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            self.requests.append(request)
        return logs_service_pb2.ExportLogsServiceResponse()

    def snapshot(self) -> list[logs_service_pb2.ExportLogsServiceRequest]:
        with self._lock:
            return list(self.requests)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def events(self) -> list[dict]:
        """Every exported log record that is an evaluation event, flattened: its
        attributes plus ``_service`` (resource service.name) and ``_scope``."""
        out = []
        for request in self.snapshot():
            for resource_logs in request.resource_logs:
                resource = _attributes(resource_logs.resource.attributes)
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        if record.event_name == EVENT:
                            out.append({**_attributes(record.attributes),
                                        "_service": resource.get("service.name"),
                                        "_scope": scope_logs.scope.name})
        return out


def _attributes(kvs) -> dict:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@pytest.fixture(scope="module")
def receiver():
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.port = port
    yield servicer
    server.stop(0).wait()


@pytest.fixture(scope="module")
def probes(probe_dir, model_dir, tmp_path_factory):
    """The fitted word-start probe and a random one: two probes, two events per request."""
    synthetic = synthetic_probe(model_dir, tmp_path_factory.mktemp("otel-probe") / "synthetic",
                                name="synthetic", layers=(15,))
    return [probe_dir, synthetic]


def _otel_env(port: int, schedule_delay_ms: int) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_SERVICE_NAME": SERVICE,
            "OTEL_BLRP_SCHEDULE_DELAY": str(schedule_delay_ms),
            "OTEL_SDK_DISABLED": "false", "OTEL_LOGS_EXPORTER": "otlp"}


def _wait_active(client: DetectorClient, timeout_s: float = 60.0) -> None:
    def active() -> bool:
        listed = client.list_probes().probes
        return len(listed) == 2 and all(p.active for p in listed)
    wait_until(active, timeout_s, what="both probes active")


def _chat(base_url: str, content: str, *, max_tokens: int, request_id: str) -> dict:
    body = {"model": _served_model(base_url), "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": content}]}
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body,
                      headers={"X-Request-Id": request_id}, timeout=300)
    resp.raise_for_status()
    return resp.json()


def _texts_to_hide(prompt: str, generated: str, scores) -> list[str]:
    """The prompt and what was generated: whole, and each span the sidecar judged (long
    enough not to match an id or a number by chance)."""
    texts = [prompt, generated, generated.strip(), scores.text]
    texts += [s.text for s in scores.spans]
    return sorted({t for t in texts if len(t.strip()) >= 6})


def _string_values(events_requests) -> list[tuple[str, str]]:
    """(key, value) of every string an exported evaluation record carries, body included."""
    out = []
    for request in events_requests:
        for resource_logs in request.resource_logs:
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    if record.body.WhichOneof("value") is not None:
                        out.append(("<body>", str(record.body)))
                    for kv in record.attributes:
                        if kv.value.WhichOneof("value") == "string_value":
                            out.append((kv.key, kv.value.string_value))
    return out


def test_one_event_per_finished_request_and_probe(vllm_server, model_dir, probes, receiver,
                                                  tmp_path_factory) -> None:
    receiver.clear()
    proc = start_sidecar(vllm_server.channel, tmp_path_factory.mktemp("otel-sidecar"),
                         probes=probes, model_dir=model_dir,
                         env=_otel_env(receiver.port, schedule_delay_ms=200))
    try:
        with DetectorClient(proc.grpc_address) as client:
            _wait_active(client)
            done = []  # (x-request-id or None, response, prompt text, generated text)
            for request_id, prompt, n in PROMPTS:
                resp = complete(vllm_server.base_url, prompt, max_tokens=n,
                                request_id=request_id)
                done.append((request_id, resp, prompt, resp["choices"][0]["text"]))
            # No X-Request-Id: vLLM makes one up, and the event carries that one.
            resp = complete(vllm_server.base_url, "The river that flows through Paris is",
                            max_tokens=10)
            done.append((None, resp, "The river that flows through Paris is",
                         resp["choices"][0]["text"]))
            request_id, content, n = CHAT
            resp = _chat(vllm_server.base_url, content, max_tokens=n, request_id=request_id)
            done.append((request_id, resp, content, resp["choices"][0]["message"]["content"]))

            scores = {resp["id"]: client.get_scores(resp["id"], wait_until_finished=True,
                                                    timeout=120)
                      for _, resp, _, _ in done}
            expected = {(rid, v.probe) for rid, s in scores.items() for v in s.verdicts}
            assert len(expected) == 2 * len(done), scores

            wait_until(lambda: {(e["gen_ai.response.id"], e["gen_ai.evaluation.name"])
                                for e in receiver.events()} >= expected,
                       60, what="an evaluation event per request and probe")
            time.sleep(1.0)  # a duplicate would come with the next batch
        events = receiver.events()
        keys = [(e["gen_ai.response.id"], e["gen_ai.evaluation.name"]) for e in events]
        # Exactly one per finished request per probe; none for other requests (the
        # module's other sidecars never saw this receiver, the probe fit is done).
        assert sorted(keys) == sorted(expected)

        for x_request_id, resp, prompt, generated in done:
            got = scores[resp["id"]]
            assert got.state is RequestState.FINISHED, got.incomplete_reason
            assert got.text == generated
            for verdict in got.verdicts:
                (event,) = [e for e in events if e["gen_ai.response.id"] == resp["id"]
                            and e["gen_ai.evaluation.name"] == verdict.probe]
                assert event["_service"] == SERVICE
                assert event["_scope"] == "detector.sidecar"
                assert event["lie_detector.request.engine_id"] == got.engine_request_id
                assert event["lie_detector.request.state"] == "FINISHED"
                assert "lie_detector.request.incomplete_reason" not in event
                if x_request_id is not None:
                    assert event["lie_detector.request.x_request_id"] == x_request_id
                else:  # the id vLLM built the response id from
                    assert resp["id"].endswith(event["lie_detector.request.x_request_id"])
                    assert event["lie_detector.request.x_request_id"]
                assert event["gen_ai.evaluation.score.label"] == (
                    "flagged" if verdict.flagged else "not_flagged")
                if verdict.score is None:
                    assert "gen_ai.evaluation.score.value" not in event
                else:  # the API sends float32; the event keeps the float64 it was
                    assert np.float32(event["gen_ai.evaluation.score.value"]) == np.float32(
                        verdict.score)
                assert np.float32(event["lie_detector.probe.threshold"]) == np.float32(
                    verdict.threshold)
                assert event["lie_detector.claims"] == verdict.claims
                assert event["lie_detector.flagged_claims"] == verdict.flagged_claims
                assert "error.type" not in event
        assert any(v.claims for s in scores.values() for v in s.verdicts), "no claims judged"

        # No prompt or completion text anywhere in what was exported: not in the bytes, and
        # every string the records carry is an id, a probe name or a fixed word.
        exported = receiver.snapshot()
        payload = b"".join(r.SerializeToString() for r in exported)
        readable = "".join(text_format.MessageToString(r) for r in exported)
        for x_request_id, resp, prompt, generated in done:
            for text in _texts_to_hide(prompt, generated, scores[resp["id"]]):
                assert text.encode() not in payload, text
                assert text not in readable, text
        ids = {resp["id"] for _, resp, _, _ in done}
        ids |= {s.engine_request_id for s in scores.values()}
        ids |= {e["lie_detector.request.x_request_id"] for e in events}
        allowed = {
            "gen_ai.evaluation.name": {"word-start", "synthetic"},
            "gen_ai.evaluation.score.label": {"flagged", "not_flagged"},
            "lie_detector.request.state": {"FINISHED"},
            "gen_ai.response.id": ids, "lie_detector.request.engine_id": ids,
            "lie_detector.request.x_request_id": ids,
        }
        explanation = re.compile(r"^(\d+ of \d+ claims reached the threshold [0-9.e-]+"
                                 r"|no claim was found to judge)$")
        for key, value in _string_values(exported):
            if key == "gen_ai.evaluation.explanation":
                assert explanation.match(value), value
            else:
                assert value in allowed.get(key, ()), (key, value)
    finally:
        proc.stop()


def test_events_queued_at_stop_are_flushed(vllm_server, model_dir, probes, receiver,
                                           tmp_path_factory) -> None:
    """With a schedule delay longer than the test, events can only arrive by the flush the
    sidecar does when it stops."""
    receiver.clear()
    proc = start_sidecar(vllm_server.channel, tmp_path_factory.mktemp("otel-flush"),
                         probes=probes, model_dir=model_dir,
                         env=_otel_env(receiver.port, schedule_delay_ms=600_000))
    try:
        with DetectorClient(proc.grpc_address) as client:
            _wait_active(client)
            resp = complete(vllm_server.base_url, "The largest ocean on Earth is",
                            max_tokens=10, request_id="otel-flush")
            scores = client.get_scores(resp["id"], wait_until_finished=True, timeout=120)
        assert scores.state.done
        time.sleep(1.0)
        assert receiver.events() == []  # still queued
    finally:
        proc.stop()
    assert proc.proc.returncode == 0
    events = receiver.events()
    assert sorted(e["gen_ai.evaluation.name"] for e in events) == sorted(
        v.probe for v in scores.verdicts)
    assert {e["gen_ai.response.id"] for e in events} == {resp["id"]}
    assert {e["lie_detector.request.x_request_id"] for e in events} == {"otel-flush"}
