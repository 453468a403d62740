"""Real vLLM with the plugin switched off by an impossible layer: the reason reaches the
user over the channel, in one line, instead of a timeout that says nothing.

Both tests share one vLLM on the embedded model (30 layers) started with layer 999 to
capture, as a hand-started server can be: the plugin refuses at model load and says
"LIE_DETECTOR_LAYERS=999 outside 1..29".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from support import start_sidecar, start_vllm, wait_until

from detector.serving.client import CaptureState, CaptureStatus, DetectorClient, DetectorError
from detector.serving.serve import ServeOptions, report_capture_status

pytestmark = pytest.mark.vllm

REASON = "LIE_DETECTOR_LAYERS=999 outside 1..29"
GENERIC_TIMEOUT = "no message from the plugin"


@pytest.fixture(scope="module")
def off_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    # Eager: capture is refused before any graph matters, and it starts 30 s sooner.
    server = start_vllm(model_dir, tmp_path_factory.mktemp("vllm-layer-999"), layers=[999],
                        enforce_eager=True)
    yield server
    server.stop()


def test_capture_cli_says_why_capture_is_off(off_server, model_dir: Path,
                                             tmp_path: Path) -> None:
    """`lie-detector capture` against a running vLLM whose plugin is off stops with the
    plugin's reason in one line (no traceback, non-zero exit), not with the 120 s "no
    message from the plugin" timeout. (A layer the model lacks given to `capture` itself
    is refused before any vLLM starts: tests/unit/test_launch_checks.py.)"""
    data = tmp_path / "user.jsonl"
    data.write_text(json.dumps({
        "id": "r1", "prompt": "Q: What is the capital of France?\nA:", "completion": " Paris",
        "spans": [{"start": 1, "end": 6, "label": "retrieval"}]}) + "\n")
    cmd = [sys.executable, "-m", "detector.cli", "capture", "--user-data", str(data),
           "--out", str(tmp_path / "capture"), "--model", str(model_dir),
           "--base-url", off_server.base_url, "--channel", off_server.channel, "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lie-detector capture: capture is OFF in vLLM (pid "), proc.stderr
    assert REASON in last
    assert GENERIC_TIMEOUT not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sidecar_and_serve_say_why_capture_is_off(off_server, model_dir, probe_free_dir,
                                                  tmp_path) -> None:
    sidecar = start_sidecar(off_server.channel, tmp_path, probes=[probe_free_dir],
                            model_dir=model_dir)
    try:
        with DetectorClient(sidecar.grpc_address, timeout=5) as client:

            def status() -> CaptureStatus:
                return client.list_probes().capture_status

            wait_until(lambda: status().state is CaptureState.OFF, 30,
                       what="capture OFF in ListProbes")
            reply = client.list_probes()
            assert REASON in reply.capture_status.reason
            assert reply.capture_status.summary.startswith("capture is OFF in vLLM (pid ")
            assert reply.capture_status.pid > 0
            assert [p.inactive_reason for p in reply.probes] == [reply.capture_status.summary]
            with pytest.raises(DetectorError) as info:
                client.get_scores("missing")
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            assert REASON in info.value.details
        # What `lie-detector serve` says in the terminal once vLLM is healthy.
        port = int(off_server.base_url.rsplit(":", 1)[1])
        opts = ServeOptions(model_dir=model_dir, port=port, grpc_address=sidecar.grpc_address)
        said = report_capture_status(opts, off_server.proc)
        assert said is not None and said.startswith("capture is OFF in vLLM (pid ")
        assert REASON in said
    finally:
        sidecar.stop()
    log = sidecar.log_path.read_text(errors="replace")
    assert log.count(REASON) == 1, "the sidecar logs the reason once"


@pytest.fixture
def probe_free_dir(model_dir: Path, tmp_path: Path) -> Path:
    from support import synthetic_probe

    return synthetic_probe(model_dir, tmp_path / "probe")
