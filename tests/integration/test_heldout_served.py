"""Smoke test of the served held-out evaluation end to end, on a handful of questions.

Uses the shared session vLLM server and a sidecar with a random-weight probe (plumbing,
not detection): asserts the result's structure and that every answer came back with a
response verdict from ``GetScores``, never a threshold on AUROC.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import start_sidecar, synthetic_probe

from probes.datasets import heldout as ho
from benchmarks.heldout_eval import EvalConfig, run


@pytest.mark.vllm
def test_heldout_harness_end_to_end(vllm_server, model_dir: Path, tmp_path: Path) -> None:
    probe = synthetic_probe(model_dir, tmp_path / "probe", name="smoke", layers=(15,))
    sidecar = start_sidecar(vllm_server.channel, tmp_path / "sidecar", probes=[probe],
                            model_dir=model_dir)
    try:
        cfg = EvalConfig(base_url=vllm_server.base_url, grpc=sidecar.grpc_address,
                         topics=["heldout_us_city_state", "heldout_us_city_state_invented",
                                 "heldout_calling_code"],
                         limit_per_topic=2, longform_real=1, longform_invented=1,
                         longform_cities=1,
                         max_tokens_longform=40, concurrency=4, bootstrap=20,
                         out=tmp_path / "heldout.json", progress=False)
        result = run(cfg)
    finally:
        sidecar.stop()

    saved = json.loads((tmp_path / "heldout.json").read_text())
    assert saved["probe"]["name"] == "smoke"
    req = saved["requests"]
    assert req["sent"] == 2 * 6 + 2 + 2 and req["errors"] == 0, req
    assert req["with_verdict_entry"] == req["sent"], req  # every answer got a verdict
    assert set(req["states"]) == {"REQUEST_STATE_FINISHED"}, req
    assert set(saved["styles"]) >= {"plain", "chat", "longform"}
    for block in saved["styles"].values():
        assert set(block["auroc"]) == {"probe", "neg_min_logprob", "neg_mean_logprob",
                                       "mean_entropy"}
    assert set(saved["verdicts"]) >= {"plain", "chat"}
    assert set(saved["topics"]["plain"]) == {"heldout_us_city_state", "heldout_calling_code"}
    assert saved["longform"]["responses"] == 2 and saved["longform_city"]["responses"] == 2
    answers = [json.loads(line) for line in
               (tmp_path / "heldout-answers.jsonl").read_text().splitlines()]
    assert {a["request_id"] for a in answers} and all(a["label"] != "error" for a in answers)
    judged = [a for a in answers if a["token_span"] is not None]
    assert judged and all(a["probe"] is not None for a in judged)
    assert (tmp_path / "heldout.png").is_file()
    assert result["timing_s"]["requests"] > 0
    assert all(t in ho.TOPICS for t in result["topics_heldout"])
