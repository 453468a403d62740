"""Whatever happens to the detector, vLLM answers exactly as it would without it."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from support import ChannelTap, complete, start_sidecar

pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of Japan is", "List three fruits:", "def fibonacci(n):"]


def _token_ids(base_url: str, prompt: str, max_tokens: int = 24) -> list[int]:
    return complete(base_url, prompt, max_tokens=max_tokens)["choices"][0]["token_ids"]


def _latest_heartbeat_drops(tap: ChannelTap, timeout_s: float = 10.0) -> int:
    deadline = time.monotonic() + timeout_s
    start = tap.heartbeats
    while tap.heartbeats == start:
        assert time.monotonic() < deadline, "no heartbeat from the hook"
        time.sleep(0.05)
    return tap.last_dropped_total


def test_without_sidecar_vllm_answers_as_without_plugin(vllm_server, vllm_server_disabled) -> None:
    """Nobody listens on the channel: steps are dropped and counted, answers unchanged."""
    tap = ChannelTap(vllm_server.channel)
    try:
        before = _latest_heartbeat_drops(tap)
    finally:
        tap.close()
    with_plugin = [_token_ids(vllm_server.base_url, p) for p in PROMPTS]
    without_plugin = [_token_ids(vllm_server_disabled.base_url, p) for p in PROMPTS]
    assert with_plugin == without_plugin
    tap = ChannelTap(vllm_server.channel)
    try:
        after = _latest_heartbeat_drops(tap)
    finally:
        tap.close()
    assert after >= before + len(PROMPTS), "steps with no sidecar were not counted as dropped"


def test_plugin_switched_off_publishes_nothing(vllm_server_disabled) -> None:
    tap = ChannelTap(vllm_server_disabled.channel)
    try:
        _token_ids(vllm_server_disabled.base_url, PROMPTS[0])
        time.sleep(2.5)  # longer than two heartbeat periods
        assert tap.steps == [] and tap.heartbeats == 0
    finally:
        tap.close()
    log = vllm_server_disabled.log_path.read_text(errors="replace")
    assert "disabled by LIE_DETECTOR_DISABLE" in log
    assert "capturing layers" not in log


def test_sidecar_killed_mid_generation_leaves_generation_intact(
    vllm_server, vllm_server_disabled, model_dir, tmp_path
) -> None:
    prompt, max_tokens = "Tell me about the history of Rome.", 96
    reference = _token_ids(vllm_server_disabled.base_url, prompt, max_tokens)
    sidecar = start_sidecar(vllm_server.channel, tmp_path, probes=[], model_dir=model_dir)
    body = {"model": str(model_dir), "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "return_token_ids": True}
    tokens: list[int] = []
    finish = None
    killed_after = None
    try:
        with httpx.stream("POST", f"{vllm_server.base_url}/v1/completions", json=body,
                          timeout=300) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[len("data: "):])["choices"][0]
                tokens.extend(choice.get("token_ids") or [])
                finish = choice.get("finish_reason") or finish
                if killed_after is None and len(tokens) >= 8:
                    sidecar.kill()
                    killed_after = len(tokens)
    finally:
        sidecar.kill()
    assert killed_after is not None and killed_after < max_tokens
    assert finish == "length"
    assert tokens == reference


def test_compile_cache_is_keyed_by_capture(vllm_server, vllm_server_disabled) -> None:
    """The aux outputs change the compiled graph; a shared compile cache must not hand the
    plugin-off server the plugin-on graph (or capture one layer set with another's)."""
    import re

    pattern = re.compile(r"torch_aot_compile/([0-9a-f]{16,})")

    def keys(server) -> set[str]:
        return set(pattern.findall(server.log_path.read_text(errors="replace")))

    on, off = keys(vllm_server), keys(vllm_server_disabled)
    assert on and off, "no AOT compile cache path in the vLLM logs"
    assert not on & off
