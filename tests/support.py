"""Real processes for the tests: a vLLM CPU server with the plugin, a sidecar, a channel tap."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from detector.channel.publisher import PendingStep
from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import CaptureStatus, EngineInfo, StepHeader
from detector.serving.serve import (
    ServeOptions,
    engine_env,
    vllm_command,
    wait_for_grpc_health,
    wait_until_healthy,
)

# Layers the test server captures (SmolLM2 has 30; transformers' hidden_states index).
# 16 and 20 are the shipped default probe's (detector/default_probe), so it scores on the session
# server (tests/integration/test_guardrails_served.py).
LAYERS = [8, 15, 16, 20, 22]
# A small token budget per step forces long prompts through chunked prefill.
MAX_BATCHED_TOKENS = 128


class FakePublisher:
    """What StepAssembler needs of ChannelPublisher: seq numbers and a hand-off that keeps
    every step offered (and reports it dropped while ``accept`` is False)."""

    def __init__(self, engine: EngineInfo | None = None) -> None:
        self.engine = engine
        self.next_seq = 0
        self.offered: list[PendingStep] = []
        self.accept = True

    def take_seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1

    def offer(self, step: PendingStep) -> bool:
        self.offered.append(step)
        return self.accept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    base_url: str
    channel: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


# Logs of the processes tests started, newest last: their tails go into a failing test's
# report (CI keeps nothing else), see conftest.py.
PROCESS_LOGS: list[tuple[str, Path]] = []


def log_tails(since: float, lines: int = 40) -> list[tuple[str, str]]:
    """(title, tail) of each process log written to since ``since`` (a ``time.time()``)."""
    out = []
    for name, path in PROCESS_LOGS:
        try:
            if path.stat().st_mtime < since:
                continue
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        out.append((f"{name} log {path}", "\n".join(tail)))
    return out


def start_vllm(model_dir: Path, workdir: Path, *, disable: bool = False,
               layers: list[int] = LAYERS, env_extra: dict[str, str] | None = None,
               enforce_eager: bool = False, annotate: bool = False) -> VllmServer:
    """``annotate``: load the OpenAI middleware (detector.serving.openai_middleware), as
    ``lie-detector serve`` does; its sidecar address goes in ``env_extra``
    (LIE_DETECTOR_ANNOTATE_GRPC_ADDRESS)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    opts = ServeOptions(
        # In a directory of its own, which the sidecar makes owner-only (a workdir made by a
        # test may be open to others, and the channel refuses that).
        model_dir=model_dir, port=port, channel=f"ipc://{workdir}/channel/channel.sock",
        layers=layers,
        max_model_len=1024, dtype="float32", enforce_eager=enforce_eager, annotate=annotate,
        vllm_args=["--max-num-batched-tokens", str(MAX_BATCHED_TOKENS),
                   "--max-num-seqs", "16", "--seed", "0"],
    )
    env = engine_env(opts, layers)
    # A smaller queue than the default (1024 steps) so the SIGSTOP test fills it in seconds;
    # still a few seconds of decoding, so a sidecar briefly starved of CPU loses nothing.
    env.setdefault("LIE_DETECTOR_QUEUE_STEPS", "256")
    if disable:
        env["LIE_DETECTOR_DISABLE"] = "1"
    env.update(env_extra or {})
    log_path = workdir / "vllm.log"
    PROCESS_LOGS.append(("vLLM", log_path))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(vllm_command(opts), env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = VllmServer(f"http://127.0.0.1:{port}", opts.channel, proc, log_path)
    try:
        wait_until_healthy(server.base_url, proc, timeout_s=400)
    except Exception:
        server.stop()
        raise RuntimeError(f"vLLM did not start:\n{server.log_tail()}") from None
    return server


def complete(base_url: str, prompt: str, *, max_tokens: int, request_id: str | None = None,
             timeout: float = 300.0, **extra: object) -> dict:
    """A greedy /v1/completions call that also returns the prompt and output token ids."""
    headers = {"X-Request-Id": request_id} if request_id else {}
    body = {"model": _served_model(base_url), "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "return_token_ids": True, **extra}
    resp = httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=timeout)
    resp.raise_for_status()
    return resp.json()


_MODEL_NAMES: dict[str, str] = {}


def _served_model(base_url: str) -> str:
    if base_url not in _MODEL_NAMES:
        models = httpx.get(f"{base_url}/v1/models", timeout=30).json()
        _MODEL_NAMES[base_url] = models["data"][0]["id"]
    return _MODEL_NAMES[base_url]


def complete_many(base_url: str, jobs: list[dict]) -> list[dict]:
    """Send requests concurrently so they share engine steps (continuous batching)."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(complete, base_url, **job) for job in jobs]
        return [f.result() for f in futures]


def token_ids(resp: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of a /v1/completions response sent with return_token_ids."""
    choice = resp["choices"][0]
    prompt = resp.get("prompt_token_ids") or choice.get("prompt_token_ids")
    return list(prompt), list(choice["token_ids"])


def hidden_state_errors(hf_model, cap: CapturedRequest, sequence: list[int], layers: list[int],
                        positions: range | None = None) -> dict[int, tuple[float, float]]:
    """Per captured layer, (max |captured - transformers|, max |transformers|) over the rows
    at ``positions`` (default: all) of ``sequence``, the token ids the engine read in
    order. Layer k is transformers' ``hidden_states[k]``, the residual stream entering
    decoder layer k."""
    positions = positions if positions is not None else range(len(sequence))
    with torch.no_grad():
        out = hf_model(torch.tensor([sequence]), output_hidden_states=True)
    errors = {}
    for li, layer in enumerate(layers):
        expected = out.hidden_states[layer][0][positions.start:positions.stop]
        got = torch.stack([cap.rows[p][li] for p in positions]).float()
        errors[layer] = (float((got - expected).abs().max()), float(expected.abs().max()))
    return errors


@dataclass
class CapturedRequest:
    """Everything the channel said about one request, by position."""

    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (layers, hidden)
    tokens: dict[int, int] = field(default_factory=dict)  # position -> input token
    sampled: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    row_count: int = 0
    finished: bool = False
    last_sampled_seq: int = -1  # the step that brought its last sampled token
    finished_seq: int = -1  # the first step that announced its end


class ChannelTap:
    """The test's own receiver on the engine's channel, using the sidecar's decoder."""

    def __init__(self, endpoint: str) -> None:
        self.subscriber = ChannelSubscriber(endpoint)
        self.requests: dict[str, CapturedRequest] = defaultdict(CapturedRequest)
        self.steps: list[StepHeader] = []
        self.heartbeats = 0
        self.capture_off: CaptureStatus | None = None  # the plugin said capture is off
        self.last_dropped_total = 0
        self.seq_gaps = 0  # steps numbered but never received (dropped by the hook)
        self._last_seq: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.subscriber.recv(timeout_s=0.2)
            if message is None:
                continue
            header, rows = message
            if isinstance(header, CaptureStatus):
                self.capture_off = None if header.enabled else header
                continue
            self.last_dropped_total = header.dropped_total
            if not isinstance(header, StepHeader):
                self.heartbeats += 1
                continue
            self.steps.append(header)
            if self._last_seq is not None and header.seq > self._last_seq + 1:
                self.seq_gaps += header.seq - self._last_seq - 1
            self._last_seq = header.seq
            for req in header.requests:
                cap = self.requests[req.req_id]
                cap.num_prompt_tokens = req.num_prompt_tokens
                for j in range(req.num_rows):
                    pos = req.first_position + j
                    cap.rows[pos] = rows[:, req.row_offset + j].clone()
                    cap.tokens[pos] = req.input_token_ids[j]
                cap.row_count += req.num_rows
                cap.sampled.extend(req.sampled_token_ids)
                if req.sampled_token_ids:
                    cap.last_sampled_seq = header.seq
            for req_id in header.finished:
                cap = self.requests[req_id]
                if not cap.finished:
                    cap.finished, cap.finished_seq = True, header.seq

    def wait_connected(self, base_url: str, timeout_s: float = 30.0) -> None:
        """Heartbeats prove the engine's socket has (re)connected to this tap."""
        deadline = time.monotonic() + timeout_s
        while self.heartbeats == 0 and not self.steps:
            if time.monotonic() > deadline:
                raise TimeoutError("no message from the engine's hook")
            time.sleep(0.1)

    def find(self, external_id: str) -> tuple[str, CapturedRequest]:
        """The captured request whose engine id starts with ``external_id-``."""
        hits = [(k, v) for k, v in self.requests.items() if k.startswith(external_id + "-")]
        assert len(hits) == 1, f"{external_id}: {len(hits)} matches in {list(self.requests)}"
        return hits[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.subscriber.close()


@dataclass
class SidecarProcess:
    proc: subprocess.Popen
    grpc_address: str
    metrics_port: int
    log_path: Path

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def start_sidecar(channel: str, workdir: Path, *, probes: list[Path], model_dir: Path,
                  env: dict[str, str] | None = None,
                  probe_roots: list[Path] = ()) -> SidecarProcess:
    """A sidecar process; LoadProbe reads under ``probe_roots`` (default: the folders holding
    ``probes``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    grpc_port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "detector.cli", "sidecar", "--channel", channel,
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--model", str(model_dir)]
    for probe in probes:
        cmd += ["--probe", str(probe)]
    for root in probe_roots:
        cmd += ["--probe-root", str(root)]
    log_path = workdir / "sidecar.log"
    PROCESS_LOGS.append(("sidecar", log_path))
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    address = f"127.0.0.1:{grpc_port}"
    try:
        wait_for_grpc_health(address, proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"sidecar did not start:\n{log_path.read_text()[-3000:]}") from None
    return SidecarProcess(proc, address, metrics_port, log_path)


def wait_for_engine(client, timeout_s: float = 30.0) -> None:
    """The sidecar learns the engine from its heartbeat; until then no probe scores.
    ``client``: a :class:`detector.serving.client.DetectorClient` or the sidecar's address."""
    from detector.serving.client import DetectorClient, ProbeInfo

    owned = isinstance(client, str)
    client = DetectorClient(client) if owned else client
    deadline = time.monotonic() + timeout_s
    listed: tuple[ProbeInfo, ...] = ()
    try:
        while time.monotonic() < deadline:
            listed = client.list_probes().probes
            if listed and all(p.active for p in listed):
                return
            time.sleep(0.2)
    finally:
        if owned:
            client.close()
    raise AssertionError(f"probes never became active: {listed}")


TRAIN_PROMPTS = [
    "The capital of Italy is", "Water is made of hydrogen and", "The first president of the USA",
    "A list of prime numbers: 2, 3, 5,", "My favourite colours are red, green and",
]


def fit_word_start_probe(channel: str, base_url: str, model_dir: Path, out: Path, *,
                         layer: int = 15, name: str = "word-start") -> Path:
    """A real probe artifact fitted on rows captured through the server.

    The label (does the token start a new word?) is arbitrary: this probe exists to check
    plumbing and attribution, not to detect anything.
    """
    import numpy as np
    from transformers import AutoTokenizer

    from detector.model_identity import identify_model
    from probes.linear import LinearProbe

    tap = ChannelTap(channel)
    try:
        tap.wait_connected(base_url)
        complete_many(base_url, [{"prompt": p, "max_tokens": 24, "request_id": f"train-{i}"}
                                 for i, p in enumerate(TRAIN_PROMPTS)])
        time.sleep(1.0)
    finally:
        tap.close()
    tok = AutoTokenizer.from_pretrained(model_dir)
    li = LAYERS.index(layer)
    xs, ys = [], []
    for cap in tap.requests.values():
        for pos, row in cap.rows.items():
            xs.append(row[li].float().numpy())
            ys.append(int(tok.convert_ids_to_tokens(cap.tokens[pos]).startswith("Ġ")))
    X, y = np.stack(xs), np.array(ys)
    assert 0 < y.sum() < len(y)
    probe = LinearProbe(C=0.1).fit(X, y)
    artifact = probe.to_artifact(name=name, model=identify_model(model_dir), layers=[layer],
                                 score_position="producer", threshold=0.5)
    artifact.save(out)
    return out


# --- reliability helpers (tests/reliability) ---------------------------------------------------


def synthetic_probe(model_dir: Path, out: Path, *, name: str = "synthetic", layers=(15,),
                    seed: int = 0, score_position: str = "producer") -> Path:
    """A valid probe artifact for the served model with random weights: it scores every
    token (plumbing, not detection) without capturing training rows from a server first."""
    from detector.artifact import ProbeArtifact, ProbeMetadata
    from detector.model_identity import identify_model

    identity = identify_model(model_dir)
    g = torch.Generator().manual_seed(seed)
    meta = ProbeMetadata(name=name, model=identity, layers=list(layers),
                         hidden_size=identity.hidden_size, score_position=score_position,
                         calibration="platt", platt_a=0.05, platt_b=0.0, threshold=0.5)
    weight = torch.randn(len(layers) * identity.hidden_size, generator=g)
    return ProbeArtifact(metadata=meta, weight=weight, bias=torch.zeros(1)).save(out)


def process_rss(pid: int) -> int:
    """Resident memory of a process in bytes (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def vllm_worker_pid(server: VllmServer, timeout_s: float = 30.0) -> int:
    """The process that runs the model (and the hook): vLLM's worker, a descendant of the
    API server process (API server -> EngineCore -> VLLM::Worker on the CPU build)."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        procs = psutil.Process(server.proc.pid).children(recursive=True)
        for wanted in ("VLLM::Worker", "EngineCore"):
            for p in procs:
                try:
                    title = " ".join(p.cmdline()) or p.name()
                except psutil.Error:
                    continue
                if wanted in title or wanted in p.name():
                    return p.pid
        if time.monotonic() > deadline:
            raise RuntimeError(f"no vLLM worker among {[p.pid for p in procs]}")
        time.sleep(0.5)


def scrape_metrics(port: int, timeout: float = 10.0) -> dict[str, float]:
    """The sidecar's Prometheus samples by name (label sets folded into the name as JSON)."""
    import json

    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=timeout).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else "")
            out[key] = s.value
    return out


def health_status(address: str, service: str, timeout: float = 5.0) -> int | None:
    """The gRPC health status of ``service`` (HealthCheckResponse enum), None if unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "") -> None:
    """Poll ``predicate`` until it is true; AssertionError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what or predicate}")
        time.sleep(interval_s)



class ServeProcess:
    """``lie-detector serve`` as a real process on free ports, its logs under ``workdir``."""

    def __init__(self, model_dir: Path, workdir: Path, *, probes: list[Path],
                 serve_args: list[str] = (), vllm_args: list[str] = ()) -> None:
        self.port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "serve.log"
        PROCESS_LOGS.append(("serve", self.log))
        PROCESS_LOGS.append(("serve sidecar", workdir / "logs" / "sidecar.log"))
        PROCESS_LOGS.append(("serve vLLM", workdir / "logs" / "vllm.log"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIE_DETECTOR_")}
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        cmd = [sys.executable, "-m", "detector.cli", "serve", "--model", str(model_dir),
               "--port", str(self.port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--log-dir", str(workdir / "logs"),
               *serve_args]
        for probe in probes:
            cmd += ["--probe", str(probe)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd + ["--", *vllm_args], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float = 400.0) -> None:
        wait_until_healthy(self.base_url, self.proc, timeout_s=timeout_s)
        wait_for_grpc_health(self.grpc_address, self.proc, timeout_s=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


# --- TLS test certificates ---------------------------------------------------------------------


def make_cert(subject: str, issuer_key=None, issuer_name=None, *, ca: bool = False):
    """(key, cert): a CA, or a leaf for ``subject`` valid for localhost and 127.0.0.1."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_name or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def write_pem(path: Path, key, cert) -> tuple[Path, Path]:
    """Write ``path``.key and ``path``.crt (PEM); returns (key file, cert file)."""
    from cryptography.hazmat.primitives import serialization

    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_pki(directory: Path, names) -> dict:
    """A test CA (``"ca"``: its cert file) and, per name, a (key file, cert file) it signed
    with that common name (leaves valid for localhost and 127.0.0.1)."""
    ca_key, ca_cert = make_cert("test-ca", ca=True)
    files: dict = {"ca": write_pem(directory / "ca", ca_key, ca_cert)[1]}
    for who in names:
        key, cert = make_cert(who, ca_key, ca_cert.subject)
        files[who] = write_pem(directory / who, key, cert)
    return files


def start_inprocess_sidecar(tmp_path: Path, **settings):
    """A sidecar in this process on a loopback port, with no engine and no probe: for the
    API's own behaviour (TLS, admin calls, statuses); LoadProbe reads under ``tmp_path``
    unless ``probe_roots`` says otherwise. Stop it with ``.stop()``."""
    from detector.sidecar.app import Sidecar, SidecarSettings

    settings.setdefault("probe_roots", [tmp_path])
    s = SidecarSettings(channel=f"ipc://{tmp_path}/ch.sock", probes=[],
                        grpc_address=f"127.0.0.1:{free_port()}", metrics_port=None, **settings)
    sidecar = Sidecar(s)
    sidecar.start()
    return sidecar
