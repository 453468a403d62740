"""``lie-detector serve``: vLLM's OpenAI server with the plugin, and the sidecar, as one pair.

The two run as separate processes on purpose: the sidecar may crash, stall or restart
without vLLM noticing (the supervisor restarts it), while vLLM ending ends the pair.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from detector.channel.auth import write_key
from detector.config import default_layers
from detector.settings import runtime_dir

logger = logging.getLogger(__name__)

# The exit status of a sidecar that cannot start as configured (its channel is held or not
# private, a bad key file): restarting it cannot help, so serve stops and says so.
EXIT_CONFIG = 2


@dataclass
class ServeOptions:
    model_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_address: str = "127.0.0.1:50051"
    metrics_port: int | None = 9464
    probes: list[Path] = field(default_factory=list)
    layers: list[int] | None = None
    # None: a channel of this instance's own (a fresh owner-only directory), so two serves on
    # one machine never meet; the Supervisor picks it and removes it at shutdown.
    channel: str | None = None
    # None: the Supervisor writes a fresh key there (``detector.channel.auth``) and hands it
    # to both processes, so only this instance's vLLM can write to its sidecar.
    channel_key_file: Path | None = None
    prefix_caching: bool = False
    # None: eager exactly where the plugin needs forward hooks (``resolve_eager``).
    enforce_eager: bool | None = None
    max_model_len: int = 2048
    # Probes must score rows of the dtype they were captured in; None: the dtype the
    # probes record (``training.served_dtype``), else vLLM's own choice.
    dtype: str | None = None
    vllm_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    # vLLM's API server loads ``detector.serving.openai_middleware``: a request sent with
    # ``X-Lie-Detector: annotate`` gets its verdict in its own response.
    annotate: bool = True
    # The false-flag rate verdicts operate at (probes with a verdict model; None: each
    # probe's shipped operating point). Changing it needs no retraining.
    target_fpr: float | None = None


def probe_layers(paths: list[Path]) -> list[int]:
    """Every layer any of the given probes reads (cheap: reads probe.json only)."""
    from detector.artifact import load_probe

    layers: set[int] = set()
    for path in paths:
        layers.update(load_probe(path).metadata.layers)
    return sorted(layers)


def probe_token_features(paths: list[Path]) -> list[str]:
    """Every token feature any of the given probes reads (hybrid probes), in canonical
    order: what the engine must compute for them."""
    from detector.artifact import load_probe
    from detector.artifact import probe_token_features as union

    return union([load_probe(p).metadata for p in paths])


def probe_dtype(paths: list[Path]) -> str | None:
    """The vLLM dtype the probes' rows were captured in, when they agree on one."""
    from detector.artifact import load_probe

    dtypes = {load_probe(p).metadata.training.get("served_dtype") for p in paths}
    dtypes.discard(None)
    if len(dtypes) > 1:
        logger.warning("probes were captured in different dtypes %s; using vLLM's default",
                       sorted(dtypes))
        return None
    return dtypes.pop() if dtypes else None


def capture_layers(opts: ServeOptions, num_layers: int) -> list[int]:
    if opts.layers:
        return sorted(set(opts.layers))
    needed = probe_layers(opts.probes) if opts.probes else []
    return sorted(set(needed) | set(default_layers(num_layers)))


def resolve_eager(opts: ServeOptions) -> None:
    """Decide ``enforce_eager`` where it was left to us: the model's capture method says
    whether torch.compile would leave the plugin without rows."""
    if opts.enforce_eager is None:
        from detector.serving.launch_checks import needs_eager

        opts.enforce_eager = needs_eager(opts.model_dir, opts.vllm_args)


def vllm_command(opts: ServeOptions) -> list[str]:
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(opts.model_dir),
        "--host", opts.host, "--port", str(opts.port),
        "--max-model-len", str(opts.max_model_len),
    ]
    if "--served-model-name" not in opts.vllm_args:
        # Clients name the model by its folder ("SmolLM2-135M-Instruct", as the README's
        # examples do); the full path stays accepted for callers that send it.
        cmd += ["--served-model-name", *dict.fromkeys([opts.model_dir.name, str(opts.model_dir)])]
    dtype = opts.dtype or probe_dtype(opts.probes)
    if dtype:
        cmd += ["--dtype", dtype]
    if not opts.prefix_caching:
        # Cached prompt rows are never recomputed, so they would never be captured.
        cmd.append("--no-enable-prefix-caching")
    if opts.enforce_eager:
        cmd.append("--enforce-eager")
    if opts.annotate:
        cmd += ["--middleware", MIDDLEWARE]
    return cmd + opts.vllm_args


def sidecar_command(opts: ServeOptions) -> list[str]:
    cmd = [sys.executable, "-m", "detector.cli", "sidecar",
           "--channel", opts.channel, "--grpc-address", opts.grpc_address,
           "--model", str(opts.model_dir)]
    cmd += ["--metrics-port", str(opts.metrics_port)] if opts.metrics_port is not None else [
        "--no-metrics"]
    for probe in opts.probes:
        cmd += ["--probe", str(probe)]
    if opts.channel_key_file is not None:
        cmd += ["--channel-key-file", str(opts.channel_key_file)]
    if opts.target_fpr is not None:
        cmd += ["--target-fpr", repr(float(opts.target_fpr))]
    return cmd


MIDDLEWARE = "detector.serving.openai_middleware.LieDetectorMiddleware"


def sidecar_dial_address(grpc_address: str) -> str:
    """Where a local client reaches the sidecar listening on ``grpc_address`` (a wildcard
    host is dialled on loopback)."""
    host, sep, port = grpc_address.rpartition(":")
    if sep and host in ("", "0.0.0.0", "[::]", "::"):
        return f"127.0.0.1:{port}"
    return grpc_address


# The sidecar's secrets: vLLM and its workers (and whatever they log or spawn) never see them.
SIDECAR_SECRETS = ("LIE_DETECTOR_ADMIN_TOKEN",)


def engine_env(opts: ServeOptions, layers: list[int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SIDECAR_SECRETS}
    if opts.channel:  # None until a Supervisor gives the instance its own
        env["LIE_DETECTOR_CHANNEL"] = opts.channel
    if opts.channel_key_file is not None:
        env["LIE_DETECTOR_CHANNEL_KEY_FILE"] = str(opts.channel_key_file)
    else:
        env.pop("LIE_DETECTOR_CHANNEL_KEY_FILE", None)
    env["LIE_DETECTOR_LAYERS"] = ",".join(map(str, layers))
    # Token features only when a loaded probe reads them (else the hook computes none);
    # with no probes given, an explicit LIE_DETECTOR_TOKEN_FEATURES is left as set.
    if opts.probes:
        features = probe_token_features(opts.probes)
        if features:
            env["LIE_DETECTOR_TOKEN_FEATURES"] = ",".join(features)
        else:
            env.pop("LIE_DETECTOR_TOKEN_FEATURES", None)
    if opts.annotate:  # the middleware in vLLM's API process asks this instance's sidecar
        env["LIE_DETECTOR_ANNOTATE_GRPC_ADDRESS"] = sidecar_dial_address(opts.grpc_address)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


class Supervisor:
    """Starts both processes; restarts the sidecar if it dies; stops both on exit."""

    def __init__(self, opts: ServeOptions, num_layers: int) -> None:
        self.opts = opts
        self._private_dir: Path | None = None
        if opts.channel is None or opts.channel_key_file is None:
            self._private_dir = Path(tempfile.mkdtemp(prefix="lie-detector-serve-",
                                                      dir=runtime_dir()))
        if opts.channel is None:
            opts.channel = f"ipc://{self._private_dir / 'channel.sock'}"
        if opts.channel_key_file is None:
            opts.channel_key_file = write_key(self._private_dir / "channel.key")
        self.layers = capture_layers(opts, num_layers)
        resolve_eager(opts)
        self.vllm: subprocess.Popen | None = None
        self.sidecar: subprocess.Popen | None = None
        self.sidecar_restarts = 0
        self._stop = False

    def _spawn(self, cmd: list[str], env: dict[str, str], name: str) -> subprocess.Popen:
        out = None
        if self.opts.log_dir is not None:
            self.opts.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.opts.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        logger.info("starting %s: %s", name, " ".join(cmd))
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)

    def start(self) -> None:
        self.sidecar = self._spawn(sidecar_command(self.opts), dict(os.environ), "sidecar")
        self.vllm = self._spawn(vllm_command(self.opts), engine_env(self.opts, self.layers), "vllm")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.request_stop())
        signal.signal(signal.SIGINT, lambda *_: self.request_stop())
        self.start()
        threading.Thread(target=report_capture_status, args=(self.opts, self.vllm),
                         name="capture-status", daemon=True).start()
        try:
            while not self._stop:
                assert self.vllm is not None and self.sidecar is not None
                if self.vllm.poll() is not None:
                    logger.error("vLLM exited with status %s", self.vllm.returncode)
                    return self.vllm.returncode or 1
                if self.sidecar.poll() == EXIT_CONFIG:
                    logger.error("the sidecar cannot start as configured (its log says why%s); "
                                 "stopping", f": {self.opts.log_dir}/sidecar.log"
                                 if self.opts.log_dir else " above")
                    return EXIT_CONFIG
                if self.sidecar.poll() is not None:
                    self.sidecar_restarts += 1
                    logger.warning("sidecar exited (%s); restarting (vLLM keeps serving)",
                                   self.sidecar.returncode)
                    time.sleep(min(5.0, 0.5 * self.sidecar_restarts))
                    self.sidecar = self._spawn(sidecar_command(self.opts), dict(os.environ),
                                               "sidecar")
                time.sleep(0.2)
            return 0
        finally:
            self.shutdown()

    def request_stop(self) -> None:
        self._stop = True

    def shutdown(self, timeout_s: float = 15.0) -> None:
        for proc in (self.vllm, self.sidecar):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in (self.vllm, self.sidecar):
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Each process leads its own group; whatever is left in it (vLLM's engine and
            # worker processes, multiprocessing's resource tracker) goes with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)


def report_capture_status(opts: ServeOptions, vllm: subprocess.Popen | None,
                          wait_s: float = 30.0) -> str | None:
    """Once vLLM is healthy, ask the sidecar (ListProbes) whether the plugin captures, and
    say in one line if it switched capture off and why; the summary, or None if unknown.
    Runs beside serving and never stops it."""
    from detector.serving.client import CaptureState, CaptureStatus, DetectorClient, DetectorError

    host = "127.0.0.1" if opts.host in ("", "0.0.0.0", "::") else opts.host
    try:
        wait_until_healthy(f"http://{host}:{opts.port}", vllm, timeout_s=3600)
        deadline = time.monotonic() + wait_s
        with DetectorClient(opts.grpc_address, timeout=2) as client:
            while time.monotonic() < deadline:
                status: CaptureStatus | None
                try:
                    status = client.list_probes().capture_status
                except DetectorError:
                    status = None  # the sidecar is (re)starting
                if status is not None and status.state is CaptureState.OFF:
                    logger.error("%s (vLLM serves on; its log has the details)", status.summary)
                    return status.summary
                if status is not None and status.state is CaptureState.ON:
                    logger.info("%s", status.summary)
                    return status.summary
                time.sleep(0.5)
    except Exception as exc:  # vLLM never healthy, stopped meanwhile, ...: said elsewhere
        logger.debug("capture status not checked: %s", exc)
    return None


def wait_until_healthy(base_url: str, proc: subprocess.Popen | None = None,
                       timeout_s: float = 300.0) -> None:
    """Poll vLLM's /health until it answers 200; fail early if the process dies."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with status {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"vLLM at {base_url} not healthy after {timeout_s:.0f} s")


def wait_for_grpc_health(address: str, proc: subprocess.Popen | None = None,
                         timeout_s: float = 60.0, service: str = "") -> None:
    """Poll the standard gRPC health service until ``service`` reports SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with status {proc.returncode} while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} {service or 'server'} not SERVING after "
                                   f"{timeout_s:.0f} s")
            time.sleep(0.2)
