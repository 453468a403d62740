"""LinearProbe: it learns, it calibrates, and its artifact scores exactly like predict_proba."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from detector.artifact import ProbeArtifactError, load_probe
from detector.model_identity import ModelIdentity
from detector.sidecar.scorer import FusedProbeScorer
from probes.linear import LinearProbe, threshold_for_fpr

H = 24
LAYERS = [3, 7]
CAPTURED = [1, 3, 5, 7]
MODEL = ModelIdentity(name="tiny", fingerprint="0123456789abcdef", hidden_size=H, num_layers=10)


def synthetic(n: int, seed: int, pos_rate: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Two clusters along a random direction, with per-feature offsets and scales like a
    residual stream's (so standardisation and its folding matter)."""
    rng = np.random.default_rng(seed)
    d = len(LAYERS) * H
    direction = np.random.default_rng(99).normal(size=d)
    direction /= np.linalg.norm(direction)
    y = rng.random(n) < pos_rate
    x = rng.normal(size=(n, d)) + np.outer(np.where(y, 2.5, -2.5), direction)
    offsets = np.random.default_rng(98).normal(scale=3.0, size=d)
    scales = np.random.default_rng(97).uniform(0.5, 4.0, size=d)
    return (x * scales + offsets).astype(np.float32), y.astype(int)


def rows_for(x: np.ndarray) -> torch.Tensor:
    """Lay probe features out as the sidecar receives them, other captured layers noise."""
    rows = torch.randn(len(CAPTURED), x.shape[0], H, generator=torch.Generator().manual_seed(5))
    for i, layer in enumerate(LAYERS):
        rows[CAPTURED.index(layer)] = torch.from_numpy(x[:, i * H : (i + 1) * H])
    return rows


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": synthetic(600, 0), "cal": synthetic(300, 1), "test": synthetic(400, 2)}


@pytest.mark.parametrize("calibration", ["platt", "none", "isotonic"])
def test_separable_auroc_and_artifact_matches_predict_proba(
    data: dict, tmp_path: Path, calibration: str
) -> None:
    x_tr, y_tr = data["train"]
    x_cal, y_cal = data["cal"]
    x_te, y_te = data["test"]
    probe = LinearProbe(calibration=calibration)
    assert probe.fit(x_tr, y_tr, X_cal=x_cal, y_cal=y_cal) is probe
    assert roc_auc_score(y_te, probe.decision_function(x_te)) > 0.95
    assert roc_auc_score(y_te, probe.predict_proba(x_te)[:, 1]) > 0.95

    art = probe.to_artifact(name=f"lin-{calibration}", model=MODEL, layers=LAYERS, threshold=0.6)
    loaded = load_probe(art.save(tmp_path / art.name))
    scorer = FusedProbeScorer([loaded], captured_layers=CAPTURED, hidden_size=H, device="cpu")
    rows = rows_for(x_te)
    np.testing.assert_allclose(scorer.logits(rows)[:, 0].double(), probe.decision_function(x_te), atol=1e-4)
    np.testing.assert_allclose(
        scorer.score(rows)[:, 0].double(), probe.predict_proba(x_te)[:, 1], atol=1e-5, rtol=0
    )


def test_learned_attributes_and_conventions(data: dict) -> None:
    x, y = data["train"]
    probe = LinearProbe(C=0.5)
    with pytest.raises(TypeError):
        LinearProbe(0.5)  # keyword-only
    assert clone(probe).get_params() == probe.get_params()
    probe.fit(x, y)
    d = x.shape[1]
    assert probe.coef_.shape == (1, d) and probe.intercept_.shape == (1,)
    assert probe.mean_.shape == (d,) and probe.scale_.shape == (d,) and (probe.scale_ > 0).all()
    assert isinstance(probe.platt_a_, float) and isinstance(probe.platt_b_, float)
    assert probe.isotonic_x_ is None
    proba = probe.predict_proba(x)
    assert proba.shape == (len(x), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba[:, 1], expit(probe.platt_a_ * probe.decision_function(x) + probe.platt_b_))
    assert probe.predict(x).shape == (len(x),)


def test_platt_fitted_on_calibration_split(data: dict) -> None:
    x_tr, y_tr = data["train"]
    x_cal, y_cal = data["cal"]
    on_train = LinearProbe().fit(x_tr, y_tr)
    on_cal = LinearProbe().fit(x_tr, y_tr, X_cal=x_cal, y_cal=y_cal)
    np.testing.assert_allclose(on_train.coef_, on_cal.coef_)
    assert (on_train.platt_a_, on_train.platt_b_) != (on_cal.platt_a_, on_cal.platt_b_)
    with pytest.raises(ValueError, match="both X_cal and y_cal"):
        LinearProbe().fit(x_tr, y_tr, X_cal=x_cal)


def test_calibration_undoes_class_balancing() -> None:
    """Balanced weights push raw probabilities toward 0.5; Platt restores the base rate."""
    x, y = synthetic(3000, 3, pos_rate=0.1)
    x[:, :] += np.random.default_rng(4).normal(scale=8.0, size=x.shape).astype(np.float32)  # overlap
    x_cal, y_cal = synthetic(3000, 5, pos_rate=0.1)
    x_cal += np.random.default_rng(6).normal(scale=8.0, size=x_cal.shape).astype(np.float32)
    raw = LinearProbe(calibration="none").fit(x, y)
    platt = LinearProbe(calibration="platt").fit(x, y, X_cal=x_cal, y_cal=y_cal)
    base = y_cal.mean()
    assert abs(platt.predict_proba(x_cal)[:, 1].mean() - base) < 0.02
    assert raw.predict_proba(x_cal)[:, 1].mean() > base + 0.1


def test_to_artifact_checks_feature_count(data: dict) -> None:
    probe = LinearProbe().fit(*data["train"])
    with pytest.raises(ProbeArtifactError, match=r"fitted on 48 features but 3 layers x hidden size 24 = 72"):
        probe.to_artifact(name="p", model=MODEL, layers=[1, 3, 7])
    with pytest.raises(ProbeArtifactError, match="threshold"):
        probe.to_artifact(name="p", model=MODEL, layers=LAYERS, threshold=1.5)
    art = probe.to_artifact(name="p", model=MODEL, layers=LAYERS, training={"data_sha256": "ab"})
    assert art.metadata.training["data_sha256"] == "ab"
    assert art.metadata.training["estimator"]["C"] == 1.0
    assert art.metadata.calibration == "platt" and art.metadata.score_position == "producer"


def test_threshold_for_fpr() -> None:
    rng = np.random.default_rng(0)
    neg = rng.random(1000).astype(np.float32)
    for fpr in (0.0, 0.01, 0.05, 0.1234, 0.5):
        t = threshold_for_fpr(neg, fpr)
        flagged = (neg >= np.float32(t)).mean()
        assert flagged <= fpr
        # minimal: one float32 step lower would flag more than allowed
        lower = np.nextafter(np.float32(t), np.float32(-np.inf))
        assert (neg >= lower).mean() > fpr
    assert threshold_for_fpr(neg, 1.0) == pytest.approx(float(neg.min()))
    ties = np.array([0.9, 0.9, 0.9, 0.1], dtype=np.float32)
    assert (ties >= threshold_for_fpr(ties, 0.5)).sum() == 0  # cannot split a tie
    with pytest.raises(ValueError):
        threshold_for_fpr([], 0.1)
    with pytest.raises(ValueError):
        threshold_for_fpr([0.1, np.nan], 0.1)
