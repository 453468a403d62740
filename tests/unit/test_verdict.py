"""The claim verdict (detector.verdict): rank fusion, calibration, operating points, and the
sidecar judging claims with it exactly as training computes it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from detector.sidecar.spans import find_spans, judge_spans
from detector.sidecar.text import DecodedText
from detector.verdict import OperatingPoint, VerdictModel, claim_signals
from probes.verdict_fit import fit_verdict, median_group_threshold


def _signals(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two noisy, partly independent views of the label (probe, -min log-prob)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    probe = 1 / (1 + np.exp(-(1.2 * y + rng.normal(size=n))))
    neglp = 1.0 * y + rng.normal(size=n) * 1.2 + 2.0
    return y, np.c_[probe, neglp]


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def test_fused_ranks_beat_each_signal_and_calibrate() -> None:
    y, x = _signals(4000)
    model = fit_verdict(y, x, target_fpr=0.1)
    p = model.probabilities(x)
    assert _auroc(y, p) > max(_auroc(y, x[:, 0]), _auroc(y, x[:, 1])) + 0.02
    # Calibrated on these claims: the mean probability in each decile matches the rate.
    order = np.argsort(p)
    for chunk in np.array_split(order, 10):
        assert abs(p[chunk].mean() - y[chunk].mean()) < 0.06
    thr = model.threshold_for(0.1)
    assert (p[y == 0] >= thr).mean() <= 0.1 + 1e-9
    assert model.threshold_for(0.05) >= thr >= model.threshold_for(0.2)


def test_ranks_do_not_move_with_a_signal_s_scale() -> None:
    """A domain whose log-probabilities all sit lower (a shift in scale) keeps its order:
    the verdict is a function of ranks, so a monotone change of one signal changes the
    verdict only through the reference it is ranked against, never the claims' order."""
    y, x = _signals(2000, seed=1)
    model = fit_verdict(y, x)
    shifted = x.copy()
    shifted[:, 1] = shifted[:, 1] * 0.5 + 1.0
    a = model.fused(x)
    b = VerdictModel.model_validate({**model.model_dump(), "reference": [
        model.reference[0], sorted(np.asarray(model.reference[1]) * 0.5 + 1.0)]}).fused(shifted)
    assert np.allclose(a, b)


def test_a_missing_signal_falls_back_to_the_others() -> None:
    y, x = _signals(500, seed=2)
    model = fit_verdict(y, x)
    only_probe = model.claim_probability({"probe": 0.9})
    both = model.claim_probability({"probe": 0.9, "neg_min_logprob": math.nan})
    assert only_probe == both and 0.0 <= only_probe <= 1.0
    assert math.isnan(model.claim_probability({}))


def test_operating_points_follow_the_typical_domain_not_the_pooled_one() -> None:
    """Two of five domains have correct answers that all score high; pooled, they set the
    threshold for everyone (the others then flag almost nothing); by the median domain,
    the typical domain flags about the target rate."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.array(list("abcde")), 400)
    neg = rng.uniform(0, 0.6, groups.size)
    neg[np.isin(groups, ["d", "e"])] += 0.4
    thr = median_group_threshold(neg, groups, 0.1)
    rates = [(neg[groups == g] >= thr).mean() for g in "abc"]
    assert all(0.05 <= r <= 0.1 + 1e-9 for r in rates)
    pooled = np.sort(neg)[::-1][int(0.1 * neg.size)]
    assert max((neg[groups == g] >= pooled).mean() for g in "abc") < 0.02


def test_verdict_round_trips_and_refuses_bad_values() -> None:
    y, x = _signals(300, seed=4)
    model = fit_verdict(y, x)
    again = VerdictModel.model_validate(json.loads(model.model_dump_json()))
    assert again == model
    bad = model.model_dump()
    for change in ({"weights": [0.5]}, {"weights": [-1.0, 0.5]},
                   {"reference": [[2.0, 1.0], model.reference[1]]},
                   {"calibration_y": list(reversed(model.calibration_y))},
                   {"signals": ["probe", "probe"]}, {"signals": ["probe", "entropy"]},
                   {"operating_points": []}, {"weights": [float("nan"), 0.5]}):
        with pytest.raises(ValidationError):
            VerdictModel.model_validate({**bad, **change})
    with pytest.raises(ValueError):
        model.threshold_for(1.5)
    with pytest.raises(ValidationError):
        OperatingPoint(target_fpr=0.0, threshold=0.5)


def test_sidecar_judges_a_claim_with_its_verdict_as_training_does() -> None:
    """The claim's score is the verdict's probability from the probe's aggregated token
    scores and the claim's lowest token log-probability; the threshold is the verdict's
    at the operator's rate; tokens outside the claim do not count."""
    y, x = _signals(1000, seed=5)
    model = fit_verdict(y, x)
    decoded = DecodedText.from_pieces([" The", " capital", " is", " Val", "doria", "."])
    scores = [{"p": s} for s in (0.99, 0.1, 0.1, 0.6, 0.7, 0.9)]
    logprobs = [-0.01, -0.2, -0.1, -3.5, -0.4, -9.0]
    spans = find_spans(decoded, prompt="What is the capital of Freedonia?")
    (claim,) = spans
    threshold = model.threshold_for(0.2)
    verdicts, responses = judge_spans(decoded, spans, scores, [("p", "max", 0.5)],
                                      ("claim",), verdicts={"p": (model, threshold)},
                                      logprobs=logprobs)
    (v,) = verdicts
    signals = claim_signals([0.6, 0.7], [-3.5, -0.4], "max")
    assert signals == {"probe": 0.7, "neg_min_logprob": 3.5}
    assert v.score == pytest.approx(model.claim_probability(signals))
    assert v.threshold == threshold and v.flagged == (v.score >= threshold)
    assert responses[0].threshold == threshold
    # Without log-probabilities (an engine without features) the probe alone decides.
    alone, _ = judge_spans(decoded, spans, scores, [("p", "max", 0.5)], ("claim",),
                           verdicts={"p": (model, threshold)}, logprobs=None)
    assert alone[0].score == pytest.approx(model.claim_probability({"probe": 0.7}))


def test_a_probe_with_a_verdict_asks_the_engine_for_log_probabilities(tmp_path) -> None:
    """The verdict's log-probability is computed by the engine only when a served probe
    needs it, and never becomes an input of the probe's own weights."""
    from dataclasses import replace

    from detector.artifact import linear_token_features, load_probe, probe_token_features
    from detector.serving.serve import ServeOptions, engine_env
    from detector.sidecar.scorer import FusedProbeScorer
    from tests.unit.test_hybrid_probes import make_probe

    y, x = _signals(300, seed=6)
    plain = make_probe("plain", features=())
    fused = replace(plain, metadata=plain.metadata.model_copy(
        update={"name": "fused", "verdict": fit_verdict(y, x)}))
    path = fused.save(tmp_path / "fused")
    loaded = load_probe(path)
    assert loaded.metadata.verdict == fused.metadata.verdict
    assert loaded.metadata.claim_threshold == fused.metadata.verdict.threshold_for()
    assert probe_token_features([loaded.metadata]) == ["logprob"]
    assert linear_token_features([loaded.metadata]) == []
    assert FusedProbeScorer([loaded], captured_layers=[4], hidden_size=loaded.metadata.hidden_size
                            ).token_features == []
    env = engine_env(ServeOptions(model_dir=tmp_path, probes=[path]), [4])
    assert env["LIE_DETECTOR_TOKEN_FEATURES"] == "logprob"
