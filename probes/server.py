"""A vLLM server with the plugin, started for one capture run on its own port and channel.

The same command line as ``lie-detector serve`` (``detector.serving.serve.vllm_command`` and
``engine_env``), so the rows a probe is trained on come from the serving configuration
it will score; only the port, the channel and the capture layers are the run's own.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from detector.serving.serve import (
    ServeOptions,
    engine_env,
    resolve_eager,
    vllm_command,
    wait_until_healthy,
)

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def private_channel(prefix: str = "ldtrain-") -> str:
    """A fresh IPC endpoint in a new owner-only directory (never the default channel)."""
    return f"ipc://{tempfile.mkdtemp(prefix=prefix)}/channel.sock"


@dataclass
class CaptureServer:
    base_url: str
    channel: str
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        logger.info("stopping the capture vLLM server (pid %d)", self.proc.pid)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __enter__(self) -> CaptureServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_capture_server(
    model_dir: Path,
    *,
    layers: list[int],
    log_dir: Path,
    channel: str | None = None,
    port: int | None = None,
    dtype: str | None = None,
    max_num_seqs: int = 16,
    max_model_len: int = 1024,
    extra_args: list[str] | None = None,
    enforce_eager: bool | None = None,
    timeout_s: float = 600.0,
) -> CaptureServer:
    """Start vLLM with the plugin capturing ``layers`` and wait until it is healthy.

    ``enforce_eager`` None: eager exactly where the plugin needs forward hooks, as ``serve``
    decides it (``detector.serving.launch_checks.needs_eager``)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = ["--max-num-seqs", str(max_num_seqs), "--seed", "0"]
    # dtype None: vLLM's own default, as `lie-detector serve` without probes; the capture
    # records what the engine reports, and serving with the probe asks for the same.
    opts = ServeOptions(
        model_dir=model_dir, port=port, channel=channel or private_channel(), layers=layers,
        max_model_len=max_model_len, dtype=dtype, vllm_args=args + list(extra_args or []),
        enforce_eager=enforce_eager,
    )
    resolve_eager(opts)
    env = engine_env(opts, sorted(set(layers)))
    log_path = log_dir / "vllm.log"
    cmd = vllm_command(opts)
    logger.info("starting vLLM for capture on port %d (layers %s, log %s)", port, layers, log_path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = CaptureServer(f"http://127.0.0.1:{port}", opts.channel, proc, log_path)
    try:
        wait_until_healthy(server.base_url, proc, timeout_s=timeout_s)
    except BaseException:
        tail = server.log_tail()
        server.stop()
        raise RuntimeError(f"vLLM did not start (log {log_path}):\n{tail}") from None
    return server


__all__ = ["CaptureServer", "free_port", "private_channel", "start_capture_server"]
