"""A real Prometheus server scrapes a real sidecar while the real vLLM server generates.

Prometheus is Debian's binary (package `prometheus`), started on a free loopback port with
its storage in a temporary folder, a 1 s scrape and evaluation interval, and the project's
real rule file with every alert's `for:` cut to 1 s (the expressions are the real ones).
Everything is asserted through Prometheus' HTTP API:

1. the sidecar's counters moved during generations (query API), and the recording rules
   produced series from them;
2. the sidecar stops: LieDetectorDown fires;
3. a new sidecar comes up on the same metrics port but on a channel vLLM does not use (the
   hook is cut): LieDetectorHookDisconnected fires, LieDetectorDown resolves.

Only one process may bind the server's channel: the first sidecar is stopped before the end.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from deploy_support import DOCKER, RULE_FILES, require_tool  # noqa: E402
from support import complete_many, free_port  # noqa: E402

pytestmark = pytest.mark.vllm

JOB = "lie-detector"


class Sidecar:
    """`lie-detector sidecar` on chosen ports (the second one reuses the first's metrics port)."""

    def __init__(self, channel: str, metrics_port: int, log_path: Path, *,
                 probes: list[Path] = (), model_dir: Path | None = None) -> None:
        self.grpc_address = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "detector.cli", "sidecar", "--channel", channel,
               "--grpc-address", self.grpc_address, "--metrics-port", str(metrics_port)]
        if model_dir is not None:
            cmd += ["--model", str(model_dir)]
        for probe in probes:
            cmd += ["--probe", str(probe)]
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait("sidecar gRPC health SERVING", self._serving, timeout_s=90,
                  alive=lambda: self.proc.poll() is None)
        except Exception:
            self.stop()
            raise RuntimeError(f"sidecar did not start:\n{log_path.read_text()[-3000:]}") from None

    def _serving(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.grpc_address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Prometheus:
    def __init__(self, binary: str, workdir: Path, metrics_port: int) -> None:
        # The real rules, with every alert's `for:` cut to 1 s so the test sees them fire.
        rules_path = workdir / "rules.yaml"
        groups = []
        for path in RULE_FILES:
            for group in yaml.safe_load(path.read_text())["groups"]:
                for rule in group["rules"]:
                    if "alert" in rule:
                        rule["for"] = "1s"
                groups.append(group)
        rules_path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(rules_path)],
            "scrape_configs": [{"job_name": JOB, "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config_path}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        _wait("Prometheus ready", self._ready, timeout_s=30, alive=lambda: self.proc.poll() is None)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, promql: str) -> list[dict]:
        reply = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        reply.raise_for_status()
        body = reply.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def firing(self) -> dict[str, list[dict]]:
        reply = httpx.get(f"{self.url}/api/v1/alerts", timeout=5)
        reply.raise_for_status()
        alerts: dict[str, list[dict]] = {}
        for alert in reply.json()["data"]["alerts"]:
            if alert["state"] == "firing":
                alerts.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return alerts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _wait(what: str, check: Callable[[], object], *, timeout_s: float,
          alive: Callable[[], bool] = lambda: True, every_s: float = 0.25):
    """Poll ``check`` until it returns something truthy; bounded in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if not alive():
            raise RuntimeError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def test_prometheus_sees_counters_move_and_alerts_when_the_hook_is_cut(
        vllm_server, probe_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    binary = require_tool("prometheus", "apt-get install prometheus (scripts/setup.sh --test)")
    metrics_port = free_port()
    instance = f"127.0.0.1:{metrics_port}"
    started = time.monotonic()
    phases: dict[str, float] = {}
    sidecar = Sidecar(vllm_server.channel, metrics_port, tmp_path / "sidecar-1.log",
                      probes=[probe_dir], model_dir=model_dir)
    second: Sidecar | None = None
    prometheus: Prometheus | None = None
    # IPC socket paths must stay under ~107 bytes: not in pytest's long tmp_path.
    socket_dir = Path(tempfile.mkdtemp(prefix="ld-e2e-"))
    try:
        prometheus = Prometheus(binary, tmp_path, metrics_port)
        # Scraped, and the sidecar hears vLLM's hook.
        _wait("sidecar scraped and connected to vLLM", lambda: prometheus.value(
            f'min(up{{job="{JOB}"}}) * min(lie_detector_hook_connected{{job="{JOB}"}})') == 1,
            timeout_s=30)
        assert "LieDetectorHookDisconnected" not in prometheus.firing()
        # The compose health check script agrees that this sidecar is serving.
        health = subprocess.run([sys.executable, str(DOCKER / "grpc_health_check.py"),
                                 sidecar.grpc_address], capture_output=True, text=True,
                                timeout=30)
        assert health.returncode == 0, health.stdout + health.stderr
        phases["ready"] = time.monotonic() - started

        # 1. Real generations move the counters, as Prometheus sees them.
        prompts = ["The capital of France is", "Three famous painters are",
                   "The tallest mountain on Earth is"]

        def generate(round_: int) -> int:
            jobs = [{"prompt": p, "max_tokens": 24, "request_id": f"prom-e2e-{round_}-{i}"}
                    for i, p in enumerate(prompts)]
            responses = complete_many(vllm_server.base_url, jobs)
            return sum(len(r["choices"][0]["token_ids"]) for r in responses)

        assert generate(1) > 0
        sel = f'{{job="{JOB}"}}'
        _wait("steps and tokens scored, seen by Prometheus", lambda: (
            (prometheus.value(f"sum(lie_detector_steps_received_total{sel})") or 0) > 0
            and (prometheus.value(f"sum(lie_detector_tokens_scored_total{sel})") or 0) > 0
            and (prometheus.value(f"sum(lie_detector_requests_scored_total{sel})") or 0)
            >= len(prompts)), timeout_s=30)
        assert prometheus.value(f"sum(lie_detector_rows_scored_total{sel})") > 0
        assert prometheus.value(f"sum(lie_detector_score_delay_seconds_count{sel})") > 0
        assert prometheus.value(f"sum(lie_detector_spans_scored_total{sel})") > 0
        assert prometheus.value(f"lie_detector_probes_active{sel}") == 1
        # The recording rules turn the real series into the ones the alerts read. A labelled
        # counter appears at its first increment, which rate() cannot see: a second round of
        # generations gives the per-probe series an increase within the rules' 5m windows.
        assert generate(2) > 0
        slo_rule = 'lie_detector:score_delay_slo_errors:ratio_rate5m{job="lie-detector"}'
        flag_rule = 'lie_detector:span_flag_ratio:rate5m{job="lie-detector"}'

        def recorded() -> tuple[list[dict], list[dict]] | None:
            slo, flag = prometheus.query(slo_rule), prometheus.query(flag_rule)
            if slo and flag and all(s["value"][1] != "NaN" for s in slo):
                return slo, flag
            return None

        slo, flag = _wait("recording rules over real series", recorded, timeout_s=30)
        assert 0 <= float(slo[0]["value"][1]) <= 1
        assert {s["metric"]["probe"] for s in flag} == {"word-start"}
        assert all(0 <= float(s["value"][1]) <= 1 for s in flag)
        phases["counters"] = time.monotonic() - started

        # 2. The sidecar goes away: its target is down, LieDetectorDown fires.
        sidecar.stop()
        down = _wait("LieDetectorDown firing",
                     lambda: prometheus.firing().get("LieDetectorDown"), timeout_s=20)
        assert down[0]["instance"] == instance and down[0]["severity"] == "critical"
        phases["down"] = time.monotonic() - started

        # 3. A sidecar on a channel vLLM does not use: scraped again, but the hook is cut.
        second = Sidecar(f"ipc://{socket_dir}/channel.sock", metrics_port,
                         tmp_path / "sidecar-2.log")

        def cut() -> list[dict] | None:
            firing = prometheus.firing()
            if "LieDetectorDown" in firing:
                return None
            return firing.get("LieDetectorHookDisconnected")

        cut_alerts = _wait("LieDetectorHookDisconnected firing, LieDetectorDown resolved", cut,
                           timeout_s=30)
        assert cut_alerts[0]["instance"] == instance
        assert prometheus.value(f'lie_detector_hook_connected{{instance="{instance}"}}') == 0
        phases["hook cut"] = time.monotonic() - started
        print(f"phases (s since the first sidecar started): "
              f"{ {k: round(v, 1) for k, v in phases.items()} }")
    finally:
        for process in (second, sidecar, prometheus):
            if process is not None:
                process.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
