"""Hybrid probes served end to end on a real vLLM server, with no train/serve skew.

Training reads a token's log-probability and top-20 entropy from the OpenAI API
(``logprobs=20``); the engine hook computes them from the step's logits. The two must be
the same numbers, and a hybrid probe's score read over gRPC must be its formula applied to
them. One server of this module's own runs with ``LIE_DETECTOR_TOKEN_FEATURES`` set.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict

import numpy as np
import pytest
import torch
from support import (
    ChannelTap,
    complete_many,
    start_sidecar,
    start_vllm,
    wait_for_engine,
)

from detector.artifact import ProbeArtifact, ProbeMetadata
from detector.serving.client import DetectorClient
from detector.engine.token_features import entropy_of
from detector.model_identity import identify_model

pytestmark = pytest.mark.vllm
logger = logging.getLogger(__name__)

PROMPTS = ["The capital of Italy is", "Q: Who wrote Hamlet?\nA:", "Numbers: 3, 1, 4, 1, 5,",
           "The chemical symbol of gold is"]
LAYER = 15
A_LOGPROB, C_ENTROPY = 0.7, -0.45


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_vllm(model_dir, tmp_path_factory.mktemp("vllm-hybrid"),
                     env_extra={"LIE_DETECTOR_TOKEN_FEATURES": "logprob,entropy"},
                     enforce_eager=True)  # starts in seconds, not minutes of compiling
    yield srv
    srv.stop()


def _jobs(tag: str) -> list[dict]:
    jobs = [{"prompt": p, "max_tokens": 12, "request_id": f"{tag}-{i}", "logprobs": 20,
             "return_tokens_as_token_ids": True} for i, p in enumerate(PROMPTS)]
    # Sampled at a temperature: the features stay those of the unprocessed distribution.
    jobs.append({**jobs[0], "request_id": f"{tag}-hot", "temperature": 1.3, "seed": 3})
    return jobs


def _api_features(resp: dict) -> tuple[np.ndarray, np.ndarray]:
    lp = resp["choices"][0]["logprobs"]
    logprobs = np.array(lp["token_logprobs"], dtype=np.float64)
    entropies = np.array([entropy_of(top, 20) for top in lp["top_logprobs"]])
    return logprobs, entropies


def test_hook_features_equal_the_api_logprobs(server) -> None:
    tap = ChannelTap(server.channel)
    try:
        tap.wait_connected(server.base_url)
        jobs = _jobs("parity")
        responses = complete_many(server.base_url, jobs)
        time.sleep(1.0)
    finally:
        tap.close()
    assert all(s.engine.token_features == ["logprob", "entropy"] for s in tap.steps)
    hook: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for step in tap.steps:
        for req in step.requests:
            if req.sampled_token_ids:
                assert req.sampled_logprobs is not None and req.sampled_entropies is not None
                hook[req.req_id]["lp"] += req.sampled_logprobs
                hook[req.req_id]["ent"] += req.sampled_entropies
    worst_lp = worst_ent = 0.0
    for job, resp in zip(jobs, responses):
        req_id, _ = tap.find(f"cmpl-{job['request_id']}-0")
        api_lp, api_ent = _api_features(resp)
        got_lp, got_ent = np.array(hook[req_id]["lp"]), np.array(hook[req_id]["ent"])
        assert got_lp.shape == api_lp.shape == (12,)
        worst_lp = max(worst_lp, float(np.abs(got_lp - api_lp).max()))
        worst_ent = max(worst_ent, float(np.abs(got_ent - api_ent).max()))
    logger.info("hook vs API: max |logprob diff| %.3g, max |entropy diff| %.3g",
                worst_lp, worst_ent)
    print(f"PARITY max|dlogprob|={worst_lp:.3g} max|dentropy|={worst_ent:.3g}")  # noqa: T201
    assert worst_lp < 1e-4 and worst_ent < 1e-4


def _probe(identity, name: str, hidden: torch.Tensor, *, position: str,
           features: dict[str, float]) -> ProbeArtifact:
    meta = ProbeMetadata(name=name, model=identity, layers=[LAYER],
                         hidden_size=identity.hidden_size, score_position=position,
                         calibration="none", threshold=0.5, token_features=list(features))
    weight = torch.cat([hidden, torch.tensor(list(features.values()), dtype=torch.float32)])
    return ProbeArtifact(metadata=meta, weight=weight, bias=torch.tensor([0.25]))


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_served_hybrid_probe_scores_match_the_formula(server, model_dir, tmp_path) -> None:
    """A pure probe and the same probe plus a feature weight: over gRPC, their logits
    differ by exactly weight x the API's feature of the token scored."""
    identity = identify_model(model_dir)
    hidden = torch.randn(identity.hidden_size, generator=torch.Generator().manual_seed(0)) * 2e-3
    specs = {
        "pure-producer": ("producer", {}),
        "hyb-producer": ("producer", {"logprob": A_LOGPROB}),
        "pure-own": ("own", {}),
        "hyb-own": ("own", {"entropy": C_ENTROPY}),
    }
    paths = [_probe(identity, name, hidden, position=pos, features=f).save(tmp_path / name)
             for name, (pos, f) in specs.items()]
    sidecar = start_sidecar(server.channel, tmp_path / "sidecar", probes=paths,
                            model_dir=model_dir)
    try:
        with DetectorClient(sidecar.grpc_address) as client:
            wait_for_engine(client)
            listed = {p.name: list(p.token_features) for p in client.list_probes().probes}
            assert listed["hyb-producer"] == ["logprob"] and listed["pure-own"] == []
            jobs = _jobs("served")
            responses = complete_many(server.base_url, jobs)
            worst = 0.0
            for job, resp in zip(jobs, responses):
                reply = client.get_scores(job["request_id"], wait_until_finished=True,
                                          timeout=30)
                api_lp, api_ent = _api_features(resp)
                names = list(reply.probes)
                for t in reply.tokens:
                    probs = {s.probe: s.probability for s in t.scores}
                    if t.index < len(reply.tokens) - 1:  # the last token has no own row
                        assert set(probs) == set(names)
                        d = _logit(probs["hyb-own"]) - _logit(probs["pure-own"])
                        worst = max(worst, abs(d - C_ENTROPY * api_ent[t.index]))
                    d = _logit(probs["hyb-producer"]) - _logit(probs["pure-producer"])
                    worst = max(worst, abs(d - A_LOGPROB * api_lp[t.index]))
            print(f"SERVED max|logit diff - formula|={worst:.3g}")  # noqa: T201
            assert worst < 2e-3
    finally:
        sidecar.stop()


def test_served_verdict_fuses_the_probe_with_the_claim_s_log_probability(
        server, model_dir, tmp_path) -> None:
    """A probe with a verdict model (detector.verdict): every claim's score read over gRPC is
    the verdict applied to the probe's own claim score and minus the lowest log-probability
    the API reports for the claim's tokens, judged at the operator's false-flag rate
    (``LIE_DETECTOR_TARGET_FPR``, no retraining); ListProbes shows that threshold."""
    from probes.verdict_fit import fit_verdict

    identity = identify_model(model_dir)
    hidden = torch.randn(identity.hidden_size, generator=torch.Generator().manual_seed(1)) * 2e-3
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    signals = np.c_[rng.uniform(0.3, 0.7, 400) + 0.1 * y, rng.exponential(2.0, 400) + y]
    base = _probe(identity, "fused", hidden, position="producer", features={})
    meta = base.metadata.model_copy(update={"verdict": fit_verdict(y, signals)})
    path = ProbeArtifact(metadata=meta, weight=base.weight, bias=base.bias).save(tmp_path / "v")
    verdict = meta.verdict
    assert verdict is not None
    sidecar = start_sidecar(server.channel, tmp_path / "sidecar", probes=[path],
                            model_dir=model_dir, env={"LIE_DETECTOR_TARGET_FPR": "0.2"})
    try:
        with DetectorClient(sidecar.grpc_address) as client:
            wait_for_engine(client)
            (info,) = client.list_probes().probes
            assert info.threshold == pytest.approx(verdict.threshold_for(0.2))
            assert verdict.threshold_for(0.2) != pytest.approx(verdict.threshold_for())
            jobs = _jobs("verdict")
            responses = complete_many(server.base_url, jobs)
            claims = 0
            for job, resp in zip(jobs, responses):
                reply = client.get_scores(job["request_id"], wait_until_finished=True,
                                          timeout=30)
                api_lp, _ = _api_features(resp)
                probs = [{s.probe: s.probability for s in t.scores} for t in reply.tokens]
                for span in reply.spans:
                    if span.kind != "claim":
                        continue
                    claims += 1
                    a, b = span.token_start, span.token_end
                    expected = verdict.claim_probability({
                        "probe": max(p["fused"] for p in probs[a:b]),
                        "neg_min_logprob": -float(api_lp[a:b].min())})
                    assert span.score == pytest.approx(expected, abs=1e-4)
                    assert span.threshold == pytest.approx(verdict.threshold_for(0.2))
                    assert span.flagged == (span.score >= span.threshold)
            assert claims >= 3
    finally:
        sidecar.stop()
