"""Training on synthetic rows: grouped splits, layer and row selection, artifact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.artifact import check_compatible, load_probe
from probes.pipeline import evaluate_probe, score_spans_with_artifact, train_from_capture
from probes.spans import load_span_table
from probes.store import CaptureStore
from probes.synthetic import SYNTHETIC_MODEL, make_synthetic_capture
from probes.train import (
    FabricationProbeTrainer,
    ProbeSelector,
    TrainConfig,
    cross_topic,
    grouped_folds,
    grouped_holdout,
)

FAST = dict(Cs=[0.1], cv_folds=3, n_random_directions=3)


@pytest.fixture(scope="module")
def own_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_capture(tmp_path_factory.mktemp("own") / "cap",
                                  signal_layer=4, signal_position="own")


@pytest.fixture(scope="module")
def own_table(own_capture: Path):
    return load_span_table(CaptureStore.open(own_capture))


def test_span_table_layout(own_table) -> None:
    t = own_table
    assert t.layers == [2, 4, 6] and t.hidden_size == 16
    assert t.n_spans == 240 and t.token_start[0] == 0
    # the own row of a token is the producer row of the next one
    assert (t.own_row - t.producer_row == 1).all()
    assert t.features(np.arange(3), [4], "own").shape == (int(t.token_count[:3].sum()), 16)
    assert t.features(np.arange(3), [2, 6], "producer").shape[1] == 32
    z = np.arange(int(t.token_count[:2].sum()), dtype=float)
    assert t.span_max(np.arange(2), z).tolist() == [t.token_count[0] - 1, z[-1]]


def test_grouped_splits_never_share_an_entity(own_table) -> None:
    t = own_table
    train, test = grouped_holdout(t.y, t.groups, 0.25, seed=0)
    assert not set(t.groups[train]) & set(t.groups[test])
    assert len(train) + len(test) == t.n_spans
    assert 0.15 < len(test) / t.n_spans < 0.35
    for tr, va in grouped_folds(t, train, 4, seed=0):
        assert not set(t.groups[tr]) & set(t.groups[va])
        assert set(tr) | set(va) == set(train)
        assert list(tr) == sorted(tr) and list(va) == sorted(va)


def test_selector_picks_the_informative_layer_and_row(own_table) -> None:
    t = own_table
    sel = ProbeSelector(Cs=[0.1], cv_folds=3, concat_top=2, progress=False).fit(
        t, np.arange(t.n_spans))
    assert sel.best_["layers"] == [4]
    assert sel.best_["position"] == "own"
    assert sel.best_["auroc_mean"] > 0.9
    others = [r["auroc_mean"] for r in sel.cv_results_ if r["layers"] in ([2], [6])]
    assert max(others) < 0.7
    assert any(len(r["layers"]) == 2 for r in sel.cv_results_)  # concatenation was tried


def test_producer_signal_is_found_too(tmp_path: Path) -> None:
    cap = make_synthetic_capture(tmp_path / "cap", signal_layer=6, signal_position="producer",
                                 n_entities=90)
    t = load_span_table(CaptureStore.open(cap))
    sel = ProbeSelector(Cs=[0.1], cv_folds=3, concat_top=0, progress=False).fit(
        t, np.arange(t.n_spans))
    assert (sel.best_["layers"], sel.best_["position"]) == ([6], "producer")


def test_trainer_calibrates_and_thresholds(own_table) -> None:
    t = own_table
    train, test = grouped_holdout(t.y, t.groups, 0.25, seed=0)
    trainer = FabricationProbeTrainer(config=TrainConfig(**FAST), progress=False).fit(t, train)
    prob = trainer.span_proba(t, test)
    assert ((prob > 0) & (prob < 1)).all()
    assert prob[t.y[test] == 1].mean() > 0.7 > 0.3 > prob[t.y[test] == 0].mean()
    oof_neg = trainer.oof_prob_[t.y[train] == 0]
    assert (oof_neg >= trainer.threshold_).mean() <= 0.10 + 1e-9
    art = trainer.to_artifact(name="synthetic-probe", model=SYNTHETIC_MODEL, training={})
    assert art.metadata.layers == [4] and art.metadata.score_position == "own"
    # the artifact scores exactly as the trainer does
    np.testing.assert_allclose(score_spans_with_artifact(art, t, test), prob, rtol=1e-4,
                               atol=1e-5)


def test_cross_topic_holds_out_each_domain(own_table) -> None:
    t = own_table
    res = cross_topic(t, np.arange(t.n_spans), layers=[4], position="own", C=0.1)
    assert set(res) == {"alpha", "beta", "gamma"}
    for name, r in res.items():
        assert name not in r["trained_on"]
        assert r["probe"].auroc > 0.85
        assert r["probe"].n == int((t.domains == name).sum())


def test_pipeline_writes_a_loadable_artifact_and_report(own_capture: Path, tmp_path: Path
                                                       ) -> None:
    out = tmp_path / "probe"
    result = train_from_capture(own_capture, out, config=TrainConfig(name="syn", **FAST),
                                progress=False, command="test")
    names = {p.name for p in out.iterdir()}
    assert {"probe.json", "probe.safetensors", "report.html", "metrics.json", "roc.png",
            "calibration.png", "layers.png", "cross_topic.png"} <= names
    art = load_probe(out)
    assert art.name == "syn" and art.metadata.layers == [4]
    check_compatible(art.metadata, SYNTHETIC_MODEL, [2, 4, 6])
    assert art.metadata.training["data_hash"] == result.metrics["data_hash"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout"]["split"]["shared_groups"] == 0
    assert metrics["heldout"]["all"]["probe"]["auroc"] > 0.9
    assert metrics["targets"]["met"] is True
    html = (out / "report.html").read_text()
    assert "Held-out entities" in html and "roc.png" in html
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # re-training replaces the bundle as a whole (the sidecar never sees a mix)
    train_from_capture(own_capture, out, config=TrainConfig(name="syn", **FAST, cross_topic=False),
                       progress=False)
    assert "cross_topic.png" not in {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".probe.*"))
    # and `eval` scores a capture with the saved artifact
    report = evaluate_probe(out, own_capture, tmp_path / "eval")
    assert report["all"]["probe"].auroc > 0.9
    assert (tmp_path / "eval" / "report.html").exists()


def test_span_weighting_makes_every_span_count_once(own_table) -> None:
    t = own_table
    spans = np.arange(20)
    w = t.token_weights(spans)
    assert w.shape == (int(t.token_count[spans].sum()),)
    assert w.mean() == pytest.approx(1.0)
    per_span = np.add.reduceat(w, np.concatenate([[0], np.cumsum(t.token_count[spans])[:-1]]))
    np.testing.assert_allclose(per_span, per_span[0])
