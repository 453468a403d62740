"""Evaluation metrics agree with scikit-learn; baselines and the control are oriented."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from detector.engine.token_features import entropy_of
from probes.evaluate import (
    baseline_scores,
    best_baseline,
    compare_on_spans,
    expected_calibration_error,
    random_direction_scores,
    recall_at_fpr,
    span_metrics,
)
from probes.spans import load_span_table
from probes.store import CaptureStore
from probes.synthetic import make_synthetic_capture


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory):
    path = make_synthetic_capture(tmp_path_factory.mktemp("cap") / "c", n_entities=60)
    return load_span_table(CaptureStore.open(path))


def test_span_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.4
    s = rng.normal(size=300) + 1.2 * y
    m = span_metrics(y, s, prob=1 / (1 + np.exp(-s)))
    assert m.auroc == pytest.approx(roc_auc_score(y, s))
    assert m.auprc == pytest.approx(average_precision_score(y, s))
    f, t, _ = roc_curve(y, s)
    assert m.recall_at_fpr == pytest.approx(t[f <= 0.1].max())
    assert (m.n, m.n_fabrication, m.n_retrieval) == (300, int(y.sum()), int((~y).sum()))


def test_recall_at_fpr_by_hand() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9.5, 9, 10, 11, 12])
    # at 10% FPR one negative (9.5) may be flagged: threshold 9 catches all four positives;
    # at 0% the threshold must stay above 9.5, which catches 10, 11 and 12 only
    assert recall_at_fpr(y, s, 0.1) == pytest.approx(1.0)
    assert recall_at_fpr(y, s, 0.0) == pytest.approx(0.75)
    assert np.isnan(recall_at_fpr(np.ones(3), np.arange(3.0)))


def test_ece_by_hand() -> None:
    y = np.array([1, 0, 1, 1])
    p = np.array([0.9, 0.9, 0.1, 0.1])
    # two bins, each |0.9 - 0.5| and |0.1 - 1.0|, weight 1/2
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.4 + 0.5 * 0.9)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


def test_undefined_metrics_are_nan_not_errors() -> None:
    m = span_metrics(np.ones(4), np.arange(4.0))
    assert np.isnan(m.auroc) and np.isnan(m.auprc)
    m = span_metrics(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.9]))
    assert m.n == 2 and m.auroc == 1.0


def test_baselines_are_oriented_towards_fabrication(table) -> None:
    spans = np.arange(table.n_spans)
    scores = baseline_scores(table, spans)
    for name, s in scores.items():
        assert s.shape == (table.n_spans,)
        assert roc_auc_score(table.y, s) > 0.5, name
    a = int(table.token_start[0])
    k = int(table.token_count[0])
    assert scores["neg_min_logprob"][0] == pytest.approx(-table.logprobs[a:a + k].min())
    assert scores["mean_entropy"][0] == pytest.approx(table.entropies[a:a + k].mean())


def test_random_direction_control_is_near_chance(table) -> None:
    spans = np.arange(table.n_spans)
    train, test = spans[::2], spans[1::2]
    scores = random_direction_scores(table, train, test, layers=[2], position="own",
                                     n_directions=10)
    aurocs = [roc_auc_score(table.y[test], s) for s in scores]
    assert 0.35 < np.mean(aurocs) < 0.65
    result = compare_on_spans(table, test, np.full(len(test), 0.5), random_scores=scores)
    assert result["random_direction"]["n_directions"] == 10
    name, auc = best_baseline(result)
    assert name in ("neg_min_logprob", "neg_mean_logprob", "mean_entropy") and auc > 0.5


def test_entropy_of_top_k() -> None:
    uniform = {str(i): np.log(0.25) for i in range(4)}
    assert entropy_of(uniform, 20) == pytest.approx(np.log(4))
    assert entropy_of({"a": 0.0}, 20) == pytest.approx(0.0)
    # renormalised over the top-k only
    assert entropy_of([np.log(0.3), np.log(0.3), np.log(0.001)], 2) == pytest.approx(np.log(2))


def test_bootstrap_gap_resamples_entities() -> None:
    from probes.evaluate import bootstrap_auroc_gap

    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.5
    strong = rng.normal(size=400) + 2.0 * y
    weak = rng.normal(size=400) + 0.5 * y
    groups = np.repeat(np.arange(200), 2)
    res = bootstrap_auroc_gap(y, strong, weak, groups, n_boot=200)
    assert res["gap"] == pytest.approx(roc_auc_score(y, strong) - roc_auc_score(y, weak))
    assert 0 < res["ci95_low"] < res["gap"] < res["ci95_high"]
    same = bootstrap_auroc_gap(y, strong, strong, groups, n_boot=50)
    assert same["gap"] == 0.0 and same["ci95_low"] == same["ci95_high"] == 0.0
