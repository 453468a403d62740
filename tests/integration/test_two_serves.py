"""Two `lie-detector serve` on one machine, as real processes: each keeps to itself.

They used to meet on one default channel path: the second sidecar crash-looped ("another
process is listening") and the second vLLM published its steps into the first sidecar. Now
each instance has a private channel and a key of its own. Both are sent a request with the
same ``X-Request-Id``; each sidecar must hold exactly its own. Then a client on the first
instance's real socket, holding the second instance's key (and one holding none), sends
forged steps and heartbeats: the connections are refused and counted, and the first
instance's scores stay byte for byte what they were.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import zmq
from support import PROCESS_LOGS, complete, free_port, wait_until

from detector.serving.client import DetectorClient, RequestState, Scores
from detector.channel.auth import client_options
from detector.channel.wire import EngineInfo, Heartbeat, encode_heartbeat
from detector.serving.serve import wait_for_grpc_health, wait_until_healthy

pytestmark = pytest.mark.vllm


class _Serve:
    def __init__(self, name: str, model_dir: Path, workdir: Path) -> None:
        self.port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log = workdir / f"{name}-serve.log"
        PROCESS_LOGS.append((f"serve {name}", self.log))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIE_DETECTOR_")}
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "detector.cli", "serve", "--model", str(model_dir),
                 "--port", str(self.port), "--grpc-port", str(self.grpc_port),
                 "--metrics-port", str(self.metrics_port), "--max-model-len", "512",
                 "--enforce-eager", "--log-dir", str(workdir / name),
                 "--", "--max-num-seqs", "4", "--seed", "0"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        PROCESS_LOGS.append((f"{name} sidecar", workdir / name / "sidecar.log"))
        PROCESS_LOGS.append((f"{name} vLLM", workdir / name / "vllm.log"))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def sidecar_args(self) -> dict[str, str]:
        """The live sidecar's --channel and --channel-key-file, read from its command line."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = child.cmdline()
            if "sidecar" in cmd and "--channel" in cmd:
                return {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
        raise AssertionError("no sidecar process under serve")

    def metric(self, name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not exported")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def _scores(address: str, request_id: str) -> Scores:
    with DetectorClient(address) as client:
        return client.get_scores(request_id, wait_until_finished=True, timeout=120)


def _forge(endpoint: str, key: bytes | None) -> None:
    """Heartbeats claiming 2e9 dropped steps and garbage, from a client on the real socket."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        if key is not None:
            client_options(sock, key)
        sock.connect(endpoint)
        beat = Heartbeat(engine=EngineInfo(engine_id="forged", model="x", hidden_size=8,
                                           num_layers=2, layers=[1], dtype="float32",
                                           capture_method="forward_hook", pid=1,
                                           started_at=0.0),
                         time_ns=time.time_ns(), dropped_total=2_000_000_000, next_seq=2_000_000_000)
        for _ in range(20):
            try:
                sock.send_multipart([bytes(f) for f in encode_heartbeat(beat)], zmq.NOBLOCK)
                sock.send_multipart([b"\x00" * 64], zmq.NOBLOCK)
            except zmq.Again:  # a refused peer never becomes writable
                pass
            time.sleep(0.05)
        sock.close()
    finally:
        ctx.term()




def test_two_serves_on_one_machine_never_meet(model_dir: Path, tmp_path: Path) -> None:
    first, second = _Serve("first", model_dir, tmp_path), _Serve("second", model_dir, tmp_path)
    try:
        for s in (first, second):
            wait_until_healthy(s.base_url, s.proc, timeout_s=400)
            wait_for_grpc_health(s.grpc_address, s.proc, timeout_s=120)

        a, b = first.sidecar_args(), second.sidecar_args()
        assert a["--channel"] != b["--channel"]
        key_a, key_b = Path(a["--channel-key-file"]), Path(b["--channel-key-file"])
        assert key_a.read_bytes() != key_b.read_bytes()
        for key in (key_a, key_b):
            assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700, key.parent

        # The same X-Request-Id on both: each sidecar holds its own request and only that.
        sent = {s: complete(s.base_url, prompt, max_tokens=12, request_id="shared-id")
                for s, prompt in ((first, "The capital of France is"),
                                  (second, "Water boils at a temperature of"))}
        held = {s: _scores(s.grpc_address, "shared-id") for s in (first, second)}
        for s in (first, second):
            assert held[s].state is RequestState.FINISHED, held[s]
            assert held[s].requests_with_id == 1
            assert held[s].text == sent[s]["choices"][0]["text"]
            assert len(held[s].tokens) == len(sent[s]["choices"][0]["token_ids"])
        before = held[first]
        dropped = first.metric("lie_detector_channel_dropped_steps_total")

        # The second instance's key, and no key, on the first instance's real socket.
        _forge(a["--channel"], key_b.read_bytes())
        _forge(a["--channel"], None)
        wait_until(lambda: first.metric("lie_detector_channel_rejected_connections_total") >= 2, 60,
                   what="both forged connections refused")
        assert first.metric("lie_detector_channel_dropped_steps_total") == dropped
        assert _scores(first.grpc_address, "shared-id") == before

        for s in (first, second):
            assert s.proc.poll() is None, f"serve exited {s.proc.returncode}"
            assert "restarting" not in s.log.read_text(errors="replace"), s.log.read_text()
    finally:
        codes = [first.stop(), second.stop()]
    assert codes == [0, 0]
    assert not Path(a["--channel-key-file"]).parent.exists(), "the private channel was left"
