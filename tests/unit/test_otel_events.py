"""OpenTelemetry evaluation events (detector.sidecar.telemetry), without vLLM.

Off without an OTLP endpoint: nothing of OpenTelemetry is imported. On: one
``gen_ai.evaluation.result`` event per probe with the verdict's values and no text, and
emitting never raises or waits on the exporter. The export to a real OTLP receiver from a
real sidecar is tested in tests/integration/test_otel_export.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from detector.claims import ResponseVerdict
from detector.sidecar.views import RequestAnalysis
from detector.sidecar.records import RequestRecord
from detector.channel.ids import client_ids
from detector.sidecar.telemetry import (
    EVENT_NAME,
    EvaluationEvents,
    events_wanted,
    otlp_log_exporter,
    otlp_protocol,
    start_evaluation_events,
)

REPO = Path(__file__).resolve().parents[2]


def _analysis(engine_id: str = "cmpl-abc-0-1a2b3c4d", incomplete: str | None = None,
              responses: list[ResponseVerdict] | None = None) -> RequestAnalysis:
    record = RequestRecord(engine_id, "engine", 3, incomplete=incomplete, finished=True)
    return RequestAnalysis(record, [], None, [], responses or [])


@pytest.fixture
def memory_events():
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter

    exporter = InMemoryLogRecordExporter()
    events = EvaluationEvents(exporter, schedule_delay_millis=20)
    yield events, exporter
    events.shutdown(1.0)


def _exported(events: EvaluationEvents, exporter) -> list[dict]:
    assert events.shutdown(5.0)
    return [dict(r.log_record.attributes, _event=r.log_record.event_name,
                 _service=r.resource.attributes["service.name"])
            for r in exporter.get_finished_logs()]


@pytest.mark.parametrize("engine_id,response_id,x_request_id,prompt_index", [
    ("cmpl-abc-0-1a2b3c4d", "cmpl-abc", "abc", 0),
    ("cmpl-my-id-2-0badf00d", "cmpl-my-id", "my-id", 2),
    ("chatcmpl-abc-1a2b3c4d", "chatcmpl-abc", "abc", None),
    ("chatcmpl-7f3e", "chatcmpl-7f3e", "7f3e", None),
    ("some-engine-id", "some-engine-id", None, None),
])
def test_client_ids_from_the_engine_id(engine_id, response_id, x_request_id,
                                       prompt_index) -> None:
    ids = client_ids(engine_id)
    assert (ids.response_id, ids.x_request_id, ids.prompt_index) == (
        response_id, x_request_id, prompt_index)


@pytest.mark.parametrize("setting,env,wanted", [
    (None, {}, False),
    (None, {"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, False),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    (None, {"OTEL_EXPORTER_OTLP_LOGS_ENDPOINT": "http://collector:4317"}, True),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_LOGS_EXPORTER": "none"}, False),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, False),
    (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, False),
    (True, {}, True),  # the exporter's default endpoint (localhost:4317)
    (True, {"OTEL_SDK_DISABLED": "TRUE"}, False),
])
def test_events_are_on_only_with_an_endpoint_or_when_asked(setting, env, wanted) -> None:
    assert events_wanted(setting, env) is wanted
    if not wanted:
        assert start_evaluation_events(setting, env) is None


def test_without_otel_variables_nothing_of_opentelemetry_is_imported(tmp_path) -> None:
    """A whole sidecar started and stopped in a process without OTEL_* variables."""
    script = f"""
import json, sys
from support import free_port
from detector.sidecar.app import Sidecar, SidecarSettings
sc = Sidecar(SidecarSettings(channel="ipc://{tmp_path}/ch.sock", metrics_port=None,
                             grpc_address=f"127.0.0.1:{{free_port()}}", shutdown_grace_s=0))
sc.start()
sc.stop()
print(json.dumps({{"events": repr(sc.events), "pipeline": repr(sc.pipeline.events),
                  "modules": sorted(m for m in sys.modules if m.startswith("opentelemetry"))}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")])
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"events": "None", "pipeline": "None", "modules": []}


def test_one_event_per_probe_with_the_verdict(memory_events) -> None:
    events, exporter = memory_events
    analysis = _analysis(responses=[ResponseVerdict("p", 0.75, 0.5, True, 3, 1),
                                    ResponseVerdict("q", float("nan"), 0.6, False, 0, 0)])
    assert events.request_finished(analysis, ["p", "q"], [0.5, 0.6]) == 2
    by_probe = {e["gen_ai.evaluation.name"]: e for e in _exported(events, exporter)}
    assert by_probe["p"] == {
        "_event": EVENT_NAME, "_service": "lie-detector-sidecar",
        "gen_ai.evaluation.name": "p",
        "gen_ai.evaluation.score.value": 0.75,
        "gen_ai.evaluation.score.label": "flagged",
        "gen_ai.evaluation.explanation": "1 of 3 claims reached the threshold 0.5",
        "gen_ai.response.id": "cmpl-abc",
        "lie_detector.request.x_request_id": "abc",
        "lie_detector.request.engine_id": "cmpl-abc-0-1a2b3c4d",
        "lie_detector.request.prompt_index": 0,
        "lie_detector.request.state": "FINISHED",
        "lie_detector.probe.threshold": 0.5,
        "lie_detector.claims": 3,
        "lie_detector.flagged_claims": 1,
    }
    # No claim: no score (NaN never leaves), the verdict is "not flagged".
    q = by_probe["q"]
    assert "gen_ai.evaluation.score.value" not in q
    assert q["gen_ai.evaluation.score.label"] == "not_flagged"
    assert (q["lie_detector.claims"], q["lie_detector.flagged_claims"]) == (0, 0)


def test_incomplete_requests_and_missing_verdicts_say_so(memory_events) -> None:
    events, exporter = memory_events
    analysis = _analysis("chatcmpl-xyz-0badf00d", incomplete="the channel dropped steps")
    assert events.request_finished(analysis, ["p"], [0.5]) == 1
    (event,) = _exported(events, exporter)
    assert event["gen_ai.response.id"] == "chatcmpl-xyz"
    assert event["lie_detector.request.x_request_id"] == "xyz"
    assert event["lie_detector.request.state"] == "INCOMPLETE"
    assert event["lie_detector.request.incomplete_reason"] == "the channel dropped steps"
    assert event["error.type"] == "no_verdict"
    assert "gen_ai.evaluation.score.label" not in event
    assert "lie_detector.request.prompt_index" not in event


def test_a_failing_emit_is_counted_never_raised(memory_events) -> None:
    events, _ = memory_events

    def broken(**_kwargs):
        raise RuntimeError("exporter pipeline broke")

    events._logger.emit = broken  # type: ignore[method-assign]
    analysis = _analysis(responses=[ResponseVerdict("p", 0.2, 0.5, False, 1, 0)])
    assert events.request_finished(analysis, ["p"], [0.5]) == 0
    assert events.failed == 1


class _HangingExporter:
    """An exporter whose collector never answers (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def export(self, batch):
        from opentelemetry.sdk._logs.export import LogRecordExportResult

        self.calls += 1
        self.release.wait(30)
        return LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def test_a_hanging_collector_holds_up_neither_scoring_nor_shutdown() -> None:
    exporter = _HangingExporter()
    events = EvaluationEvents(exporter, schedule_delay_millis=10)
    analysis = _analysis(responses=[ResponseVerdict("p", 0.2, 0.5, False, 1, 0)])
    try:
        t0 = time.monotonic()
        for _ in range(200):
            events.request_finished(analysis, ["p"], [0.5])
        assert time.monotonic() - t0 < 2.0
        assert events.emitted == 200
        t0 = time.monotonic()
        assert events.shutdown(0.5) is False  # gave up on the export, did not wait 30 s
        assert time.monotonic() - t0 < 2.0
        assert events.request_finished(analysis, ["p"], [0.5]) == 0  # closed
    finally:
        exporter.release.set()


def test_protocols() -> None:
    assert otlp_protocol({}) == "grpc"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == "http/protobuf"
    assert otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                          "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL": "grpc"}) == "grpc"
    with pytest.raises(ValueError, match="http/json"):
        otlp_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    grpc_exporter = otlp_log_exporter("grpc")
    http_exporter = otlp_log_exporter("http/protobuf")
    try:
        assert type(grpc_exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.grpc")
        assert type(http_exporter).__module__.startswith("opentelemetry.exporter.otlp.proto.http")
    finally:
        grpc_exporter.shutdown()
        http_exporter.shutdown()


def test_an_unsupported_protocol_is_a_settings_error(tmp_path, monkeypatch) -> None:
    from support import free_port

    from detector.sidecar.app import Sidecar, SettingsError, SidecarSettings

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    settings = SidecarSettings(channel=f"ipc://{tmp_path}/ch.sock", metrics_port=None,
                               grpc_address=f"127.0.0.1:{free_port()}", probes=[])
    with pytest.raises(SettingsError, match="http/json"):
        Sidecar(settings)
