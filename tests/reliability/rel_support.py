"""Helpers shared by the reliability tests that run real vLLM and sidecar processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2
from support import (
    PROCESS_LOGS,
    SidecarProcess,
    _served_model,
    complete,
    free_port,
    health_status,
    scrape_metrics,
    wait_for_grpc_health,
    wait_until,
)

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HOOK = "liedetector.v1.Hook"

PROMPTS = [
    "The history of the Roman Empire begins with",
    "Write a short poem about the sea:",
    "Explain how a steam engine works.",
    "List the planets of the solar system:",
    "The recipe for a simple bread is",
    "Describe the city of Paris in the spring.",
    "def quicksort(items):",
    "The main causes of the First World War were",
    "A haiku about autumn leaves:",
    "Photosynthesis is the process by which",
    "The rules of chess say that",
    "Tell me a story about a lighthouse keeper.",
]


def hook_serving(sidecar) -> bool:
    return health_status(sidecar.grpc_address, HOOK) == SERVING


def wait_hook(sidecar, serving: bool = True, timeout_s: float = 60.0) -> None:
    want = SERVING if serving else NOT_SERVING
    wait_until(lambda: health_status(sidecar.grpc_address, HOOK) == want, timeout_s,
               what=f"hook health {'SERVING' if serving else 'NOT_SERVING'}")


def metric(sidecar, name: str, default: float = 0.0) -> float:
    return scrape_metrics(sidecar.metrics_port).get(name, default)


def get_scores(stub, request_id: str, *, wait: bool = False, timeout: float = 30.0):
    """The ScoresResponse, or the grpc.StatusCode it was refused with."""
    try:
        return stub.GetScores(pb.GetScoresRequest(request_id=request_id, wait_until_finished=wait),
                              timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()


def token_ids(resp: dict) -> list[int]:
    return resp["choices"][0]["token_ids"]


def assert_fully_scored(reply, resp: dict, probe: str) -> None:
    """FINISHED, every generated token listed in order with the HTTP response's ids, and
    every token scored by ``probe``."""
    assert not isinstance(reply, grpc.StatusCode), f"{resp.get('id')}: {reply}"
    assert reply.state == pb.REQUEST_STATE_FINISHED, \
        f"{reply.request_id}: state {reply.state} ({reply.incomplete_reason})"
    assert [t.token_id for t in reply.tokens] == token_ids(resp)
    unscored = [t.index for t in reply.tokens
                if not any(s.probe == probe for s in t.scores)]
    assert not unscored, f"{reply.request_id}: tokens {unscored[:10]} unscored"


def assert_incomplete_or_unknown(reply, resp: dict, reference: dict[int, float] | None,
                                 probe: str, atol: float = 2e-3) -> str:
    """A request the sidecar could not see whole: NOT_FOUND, or INCOMPLETE with a reason;
    whatever tokens and scores it does list are right. Returns 'not_found'/'incomplete'."""
    if isinstance(reply, grpc.StatusCode):
        assert reply == grpc.StatusCode.NOT_FOUND, reply
        return "not_found"
    assert reply.state == pb.REQUEST_STATE_INCOMPLETE, \
        f"{reply.request_id}: state {reply.state}, expected INCOMPLETE or NOT_FOUND"
    assert reply.incomplete_reason, "INCOMPLETE without a reason"
    http = token_ids(resp)
    assert len(reply.tokens) <= len(http)
    for t in reply.tokens:
        assert t.token_id in (http[t.index], -1), f"token {t.index}: {t.token_id} != {http[t.index]}"
        if reference is not None and t.index in reference:
            for s in t.scores:
                if s.probe == probe and t.token_id != -1:
                    assert abs(s.probability - reference[t.index]) < atol, \
                        f"token {t.index}: score {s.probability} != reference {reference[t.index]}"
    return "incomplete"


def probe_scores(reply, probe: str) -> dict[int, float]:
    return {t.index: s.probability for t in reply.tokens for s in t.scores if s.probe == probe}


@dataclass
class Load:
    """Generations run concurrently in the background; results by request id."""

    base_url: str
    jobs: list[dict]
    results: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)
    started: float = 0.0

    def __post_init__(self) -> None:
        self._threads = [threading.Thread(target=self._one, args=(job,), daemon=True)
                         for job in self.jobs]

    def _one(self, job: dict) -> None:
        try:
            self.results[job["request_id"]] = complete(self.base_url, **job)
        except Exception as exc:  # reported by join()
            self.errors[job["request_id"]] = repr(exc)
        self.finished_at[job["request_id"]] = time.monotonic()

    def start(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    def join(self, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert self.done(), f"generations still running after {timeout_s:.0f} s"
        assert not self.errors, self.errors
        return max(self.finished_at.values()) - self.started


def stream_and_close(base_url: str, prompt: str, *, request_id: str, max_tokens: int,
                     close_after: int, timeout: float = 120.0,
                     tokens: list[int] | None = None) -> list[int]:
    """A streaming completion that the client walks away from after ``close_after`` tokens
    (vLLM aborts it when the connection closes). Returns the token ids it received (also
    appended to ``tokens`` as they arrive, if given)."""
    body = {"model": _served_model(base_url), "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "return_token_ids": True, "ignore_eos": True}
    tokens = [] if tokens is None else tokens
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=timeout,
                      headers={"X-Request-Id": request_id}) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "choices" not in event:  # an error event: the server is going away
                break
            choice = event["choices"][0]
            tokens.extend(choice.get("token_ids") or [])
            if len(tokens) >= close_after:
                break
    return tokens


def detector_stub(sidecar):
    channel = grpc.insecure_channel(sidecar.grpc_address)
    return channel, pb_grpc.DetectorStub(channel)


DROPPED = "lie_detector_channel_dropped_steps_total"


def scored_batch(base_url: str, stub, sidecar, jobs_for, probe: str, *, attempts: int = 3,
                 timeout_s: float = 300.0) -> tuple[Load, dict[str, dict[int, float]], float]:
    """Run a batch (``jobs_for(attempt)`` gives its jobs) that the sidecar must score whole:
    every request FINISHED, every token scored. Returns the load, the scores by prompt and
    the batch's duration.

    On a machine this busy the sidecar can fall behind and the hook then drops steps (fail-
    open, counted). Only a batch during which the sidecar counted drops is tried again; an
    incomplete request without a counted drop is a failure."""
    for attempt in range(attempts):
        before = metric(sidecar, DROPPED)
        load = Load(base_url, jobs_for(attempt)).start()
        elapsed = load.join(timeout_s)
        try:
            scores = {}
            for job in load.jobs:
                reply = get_scores(stub, job["request_id"], wait=True)
                assert_fully_scored(reply, load.results[job["request_id"]], probe)
                scores[job["prompt"]] = probe_scores(reply, probe)
            return load, scores, elapsed
        except AssertionError as exc:
            time.sleep(1.5)  # housekeeping publishes the drop counter once a second
            dropped = metric(sidecar, DROPPED) - before
            if dropped == 0 or attempt == attempts - 1:
                raise AssertionError(f"{exc} (steps dropped and counted during the batch: "
                                     f"{dropped:.0f})") from None
            print(f"\n(batch {attempt}: {dropped:.0f} steps dropped under load; trying again)")
    raise AssertionError("unreachable")


_STANDBY = """
import sys, time
from pathlib import Path
import detector.cli, detector.sidecar.app  # the slow part, done while on standby
trigger = Path(sys.argv[1])
while not trigger.exists():
    time.sleep(0.02)
sys.exit(detector.cli.main(sys.argv[2:]))
"""


class StandbySidecar:
    """A sidecar process with its imports done, waiting to bind the channel.

    On this 2-core CPU box a new process gets almost no CPU while vLLM generates (its
    imports take until vLLM goes idle), so a sidecar started after a crash would only come
    up once every request in flight had ended. A supervisor keeping one warm is realistic
    and lets the test see requests that span the restart."""

    def __init__(self, channel: str, workdir: Path, *, probes: list[Path], model_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.trigger = workdir / "go"
        grpc_port, metrics_port = free_port(), free_port()
        argv = ["sidecar", "--channel", channel, "--grpc-port", str(grpc_port),
                "--metrics-port", str(metrics_port), "--model", str(model_dir)]
        for probe in probes:
            argv += ["--probe", str(probe)]
        log_path = workdir / "sidecar.log"
        PROCESS_LOGS.append(("standby sidecar", log_path))
        with log_path.open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", _STANDBY, str(self.trigger), *argv],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
        self.process = SidecarProcess(proc, f"127.0.0.1:{grpc_port}", metrics_port, log_path)

    def activate(self, timeout_s: float = 120.0) -> SidecarProcess:
        self.trigger.touch()
        try:
            wait_for_grpc_health(self.process.grpc_address, self.process.proc,
                                 timeout_s=timeout_s)
        except Exception:
            self.process.kill()
            raise RuntimeError("standby sidecar did not start:\n"
                               + self.process.log_path.read_text()[-3000:]) from None
        return self.process
