"""The NeMo Guardrails output rail (detector/serving/guardrails.py) over a real sidecar and vLLM
server: its error spans are the flagged claim spans ``DetectorClient.get_scores`` returns."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support import SidecarProcess, start_sidecar

from detector.artifact import default_probe_dir
from detector.serving.client import DetectorClient
from detector.cli.demo import SYSTEM_PROMPT
from detector.serving.guardrails import ACTION_NAME, COLANG_FLOW, FLOW_NAME, register

pytestmark = pytest.mark.vllm
nemo = pytest.importorskip("nemoguardrails")

MADE_UP = "Who discovered the element Quorvium?"
KNOWN = "What is the capital of France?"


@pytest.fixture(scope="module")
def sidecar(vllm_server, model_dir, tmp_path_factory) -> Iterator[SidecarProcess]:
    probe = default_probe_dir()
    if probe is None:
        pytest.skip("the shipped default probe is not built")
    # Binds the shared server's channel: stopped at the end of the module.
    process = start_sidecar(vllm_server.channel, tmp_path_factory.mktemp("guardrails-sidecar"),
                            probes=[probe], model_dir=model_dir)
    try:
        with DetectorClient(process.grpc_address) as client:
            deadline = time.monotonic() + 60
            while not all(p.active for p in client.list_probes().probes):
                assert time.monotonic() < deadline, "the default probe never became active"
                time.sleep(0.2)
        yield process
    finally:
        process.stop()


def ask(base_url: str, question: str) -> tuple[str, str]:
    """A greedy chat completion as the demo asks it; returns (response id, text)."""
    response_id = f"guard-{uuid.uuid4().hex[:12]}"
    model = httpx.get(f"{base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    resp = httpx.post(f"{base_url}/v1/chat/completions", headers={"X-Request-Id": response_id},
                      timeout=300, json={
                          "model": model, "max_tokens": 40, "temperature": 0.0,
                          "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                       {"role": "user", "content": question}]})
    resp.raise_for_status()
    return response_id, resp.json()["choices"][0]["message"]["content"]


def guard(address: str, response_id: str, question: str, text: str) -> tuple[str, dict[str, Any]]:
    """Runs the output rail in a real LLMRails; returns (final response, the action's result)."""
    config = nemo.RailsConfig.from_content(
        colang_content=COLANG_FLOW, yaml_content=f"rails:\n  output:\n    flows:\n      - {FLOW_NAME}\n")
    rails = register(nemo.LLMRails(config), address, timeout=120.0)
    res = rails.generate(messages=[{"role": "context", "content": {"response_id": response_id}},
                                   {"role": "user", "content": question},
                                   {"role": "assistant", "content": text}],
                         options={"rails": ["output"], "log": {"activated_rails": True}})
    results = [a.return_value for r in res.log.activated_rails for a in r.executed_actions
               if a.action_name == ACTION_NAME]
    assert len(results) == 1, res.log.activated_rails
    return str(res.response[0]["content"]), results[0]


@pytest.mark.parametrize("question,flagged", [(MADE_UP, True), (KNOWN, False)])
def test_rail_error_spans_are_the_flagged_claims(vllm_server, sidecar, question, flagged) -> None:
    response_id, text = ask(vllm_server.base_url, question)
    final, result = guard(sidecar.grpc_address, response_id, question, text)
    with DetectorClient(sidecar.grpc_address) as client:
        scores = client.get_scores(response_id, wait_until_finished=True, timeout=60)
    expected = [(s.char_start, s.char_end, s.text) for s in scores.flagged_spans
                if s.kind == "claim"]
    got = [(e["start"], e["end"], text[e["start"]:e["end"]]) for e in result["error_spans"]]
    print(f"{question!r} -> {text!r}; flagged {expected}; rail {got}; error {result['error']!r}")
    assert result["error"] == ""
    assert got == expected
    assert bool(expected) is flagged, f"the default probe's judgement of {text!r} changed"
    assert result["passed"] is (not flagged)
    assert (final == text) is (not flagged)
