"""vLLM killed and restarted under a running sidecar: the sidecar notices (hook health NOT_SERVING,
``lie_detector_hook_connected`` 0), ends the request vLLM dropped as incomplete, and picks
up the new engine on the same channel (SERVING again, new requests scored fully).

This test starts its own small vLLM server twice (two start-ups: the slowest test here).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import httpx
import pytest
from rel_support import (
    PROMPTS,
    assert_fully_scored,
    detector_stub,
    get_scores,
    metric,
    stream_and_close,
    wait_hook,
)
from support import complete, start_sidecar, start_vllm, synthetic_probe, wait_until

from detector.api.liedetector.v1 import detector_pb2 as pb

pytestmark = pytest.mark.vllm

PROBE = "synthetic"


def _scored(stub, base_url: str, request_id: str, prompt: str) -> pb.ScoresResponse:
    resp = complete(base_url, prompt, max_tokens=24, request_id=request_id)
    reply = get_scores(stub, request_id, wait=True)
    assert_fully_scored(reply, resp, PROBE)
    return reply


def test_vllm_restarted_under_a_running_sidecar(model_dir, tmp_path) -> None:
    probe = synthetic_probe(model_dir, tmp_path / PROBE, name=PROBE)
    engine_dir = tmp_path / "engine"  # both servers: the same channel path
    phases: dict[str, float] = {}
    t = time.monotonic()
    # Eager: what is tested is the sidecar across a restart, not the compiled graph (the
    # session server covers that); each compiled start costs about 30 s more on 2 cores.
    first = start_vllm(model_dir, engine_dir, enforce_eager=True)
    phases["first vLLM start"] = time.monotonic() - t
    second = None
    sidecar = start_sidecar(first.channel, tmp_path / "sidecar", probes=[probe],
                            model_dir=model_dir, env={"LIE_DETECTOR_HOOK_TIMEOUT_S": "4"})
    ch, stub = detector_stub(sidecar)
    try:
        wait_hook(sidecar)
        assert metric(sidecar, "lie_detector_hook_connected") == 1
        before = _scored(stub, first.base_url, "before-restart", PROMPTS[0])

        # A generation in flight when vLLM goes away.
        received: list[int] = []
        stream = threading.Thread(target=_stream_until_gone, daemon=True,
                                  args=(first.base_url, received))
        stream.start()
        wait_until(lambda: _tokens(stub, "cut-by-restart") >= 4, 120, what="tokens in flight")
        # vLLM dies with the request in flight (a graceful SIGTERM would wait 30 s for the
        # open stream): every process of the server at once, as a crash or an OOM kill does.
        t = time.monotonic()
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(30)
        phases["first vLLM killed"] = time.monotonic() - t
        stream.join(60)

        t = time.monotonic()
        wait_hook(sidecar, serving=False, timeout_s=60)
        phases["hook NOT_SERVING after the stop"] = time.monotonic() - t
        wait_until(lambda: metric(sidecar, "lie_detector_hook_connected") == 0, 30,
                   what="hook_connected 0")
        cut = get_scores(stub, "cut-by-restart", wait=True, timeout=30)
        assert not isinstance(cut, grpc.StatusCode), cut
        if cut.state == pb.REQUEST_STATE_FINISHED:  # vLLM's abort reached the sidecar
            assert all(t.scored for t in cut.tokens)
        else:
            assert cut.state == pb.REQUEST_STATE_INCOMPLETE and cut.incomplete_reason
        got = [t.token_id for t in cut.tokens]
        assert got[: len(received)] == received[: len(got)]  # the tokens it has are right

        t = time.monotonic()
        second = start_vllm(model_dir, engine_dir, enforce_eager=True)
        phases["second vLLM start"] = time.monotonic() - t
        assert second.channel == first.channel
        t = time.monotonic()
        wait_hook(sidecar, timeout_s=120)
        phases["hook SERVING after the start"] = time.monotonic() - t
        wait_until(lambda: metric(sidecar, "lie_detector_hook_connected") == 1, 30,
                   what="hook_connected 1")
        after = _scored(stub, second.base_url, "after-restart", PROMPTS[0])
        assert after.engine_request_id != before.engine_request_id
        # Same model, same prompt, greedy: the new engine's answer and scores match.
        assert [t.token_id for t in after.tokens] == [t.token_id for t in before.tokens]
        for a, b in zip(after.tokens, before.tokens):
            assert a.scores[0].probability == pytest.approx(b.scores[0].probability, abs=2e-3)
        assert metric(sidecar, "lie_detector_steps_received_total") > 0
        # What was recorded before the restart is still readable, and still says so.
        assert get_scores(stub, "before-restart").state == pb.REQUEST_STATE_FINISHED
        assert get_scores(stub, "cut-by-restart").state == cut.state
        print(f"\nvLLM restart: request in flight ended {pb.RequestState.Name(cut.state)} "
              f"({cut.incomplete_reason or 'no reason'}), {len(cut.tokens)} tokens listed, "
              f"{len(received)} received by the client; phases (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    finally:
        ch.close()
        sidecar.stop()
        for server in (second, first):
            if server is not None:
                server.stop()


def _stream_until_gone(base_url: str, received: list[int]) -> None:
    try:
        stream_and_close(base_url, PROMPTS[11], request_id="cut-by-restart", max_tokens=900,
                         close_after=10_000, tokens=received)
    except (httpx.HTTPError, OSError):
        pass  # vLLM went away mid-stream: expected


def _tokens(stub, request_id: str) -> int:
    reply = get_scores(stub, request_id, timeout=5)
    return 0 if isinstance(reply, grpc.StatusCode) else len(reply.tokens)
