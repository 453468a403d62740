"""Training on synthetic rows: grouped splits, topic balance, leave-one-topic-out selection,
layer and row selection, artifact round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from detector.artifact import check_compatible, load_probe
from probes.pipeline import evaluate_probe, score_spans_with_artifact, train_from_capture
from probes.spans import load_span_table
from probes.store import CaptureStore
from detector.claims import aggregate_segments
from probes.synthetic import SYNTHETIC_MODEL, make_synthetic_capture, make_topic_leak_table
from probes.train import (
    FabricationProbeTrainer,
    ProbeSelector,
    TrainConfig,
    balance_topics,
    cross_topic,
    grouped_folds,
    grouped_holdout,
    heldout_folds,
    topic_balanced_weights,
    training_weights,
    within_topic_auroc,
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


def test_span_scores_aggregate_as_the_sidecar_does(own_table) -> None:
    t = own_table
    spans = np.array([5, 0, 7])
    z = np.random.default_rng(0).normal(size=int(t.token_count[spans].sum()))
    for how in ("max", "mean"):
        np.testing.assert_array_equal(t.span_scores(spans, z, how),
                                      aggregate_segments(z, t.token_count[spans], how))
    np.testing.assert_array_equal(t.span_max(spans, z), aggregate_segments(z, t.token_count[spans]))


# ----------------------------------------------------------------------------- topic leak


@pytest.fixture(scope="module")
def leak_table():
    return make_topic_leak_table()


def test_invented_templates_count_in_the_topic_they_imitate(leak_table) -> None:
    t = leak_table
    keys = balance_topics(t)
    invented = t.topics == "invented_element_discoverer"
    assert invented.any() and (keys[invented] == "element_discoverer").all()
    assert (keys[~invented] == t.topics[~invented]).all()


def test_topic_balanced_weights_give_every_topic_and_class_equal_mass() -> None:
    y = np.array([1] * 30 + [0] * 10 + [1] * 20 + [0] * 40 + [1] * 3 + [0] * 50 + [1] * 7)
    topics = np.array(["a"] * 40 + ["b"] * 60 + ["c"] * 53 + ["d"] * 7)
    w = topic_balanced_weights(y, topics, min_class_spans=10)
    assert w.mean() == pytest.approx(1.0) and (w >= 0).all()

    def mass(t: str, label: int) -> float:
        return float(w[(topics == t) & (y == label)].sum())

    # within a topic: as much fabrication as retrieval; full topics carry equal mass
    for t in ("a", "b", "c"):
        assert mass(t, 1) == pytest.approx(mass(t, 0))
    assert mass("a", 1) == pytest.approx(mass("b", 1))
    # 3 fabrications only: capped to 3/10 of a full topic (not 3 spans of huge weight)
    assert mass("c", 1) == pytest.approx(0.3 * mass("a", 1))
    assert w[(topics == "c") & (y == 1)].max() <= w[(topics == "a") & (y == 0)].max() + 1e-12
    # a topic of one class teaches only its base rate: no weight
    assert mass("d", 1) == 0.0
    # a feature that only knows the topic is uncorrelated with the label under the weights
    for t in ("a", "b", "c", "d"):
        m = topics == t
        if w[m].sum():
            assert np.average(y[m], weights=w[m]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        topic_balanced_weights(np.array([1, 1, 0]), np.array(["x", "x", "y"]))


def test_training_weights_fall_back_to_global_balance(leak_table, caplog) -> None:
    t = leak_table
    spans = np.flatnonzero(np.isin(t.topics, ["country_capital", "country_currency"]))
    w = training_weights(t, spans, topic_balance=True)
    assert w is not None and w.mean() == pytest.approx(1.0)
    # tokens of one span share its weight (span weighting)
    per_span = aggregate_segments(w, t.token_count[spans], "mean") * t.token_count[spans]
    y = t.y[spans]
    keys = balance_topics(t, spans)
    for k in set(keys):
        m = keys == k
        assert per_span[m & (y == 1)].sum() == pytest.approx(per_span[m & (y == 0)].sum())
    # one-class topics only (fabrications here, retrievals there): balance over all spans
    one_class = np.concatenate([spans[(keys == "country_capital") & (y == 0)],
                                spans[(keys == "country_currency") & (y == 1)]])
    with caplog.at_level("WARNING"):
        w = training_weights(t, one_class, topic_balance=True)
    assert "balancing the classes over all topics" in caplog.text
    per_span = aggregate_segments(w, t.token_count[one_class], "mean") * t.token_count[one_class]
    assert per_span[t.y[one_class] == 1].sum() == pytest.approx(per_span[t.y[one_class] == 0].sum())


def test_leave_one_topic_out_folds(leak_table) -> None:
    t = leak_table
    spans = np.arange(t.n_spans)
    folds = heldout_folds(t, spans, "topics")
    keys = balance_topics(t)
    assert len(folds) == len(set(keys))  # the invented template is no topic of its own
    seen = np.concatenate([val for _, val in folds])
    assert sorted(seen.tolist()) == spans.tolist()  # every span validated exactly once
    for train, val in folds:
        assert len(set(keys[val])) == 1 and not set(keys[train]) & set(keys[val])
    domains = heldout_folds(t, spans, "domains")
    assert len(domains) == 3
    for train, val in domains:
        assert not set(t.domains[train]) & set(t.domains[val])


def test_within_topic_auroc_ignores_offsets_between_topics(leak_table) -> None:
    t = leak_table
    spans = np.arange(t.n_spans)
    base_rate = np.array([np.mean(t.y[balance_topics(t) == k]) for k in balance_topics(t)])
    pooled_auc = float(__import__("sklearn.metrics").metrics.roc_auc_score(t.y, base_rate))
    assert pooled_auc > 0.75  # knowing the topic predicts the label across topics ...
    per_topic = within_topic_auroc(t, spans, base_rate)
    assert per_topic and all(a == pytest.approx(0.5) for a in per_topic.values())  # ... not within


def test_old_protocol_learns_the_topic_and_the_new_one_does_not(leak_table) -> None:
    """Layer 2 knows only the topic (whose base rate predicts the label); layer 4 carries a
    weaker signal that holds within every topic. Entity-grouped CV with global class balance
    (the former protocol) picks the topic layer; the default trainer must not."""
    t = leak_table
    spans = np.arange(t.n_spans)
    common = dict(Cs=[0.1], score_positions=["own"], concat_top=0, n_random_directions=2,
                  cross_topic=False)
    old = FabricationProbeTrainer(config=TrainConfig(cv_scheme="entities", topic_balance=False,
                                                     **common), progress=False).fit(t, spans)
    assert old.layers_ == [2]
    new = FabricationProbeTrainer(config=TrainConfig(**common), progress=False).fit(t, spans)
    assert new.selector_.cv_scheme_ == "topics"
    assert new.layers_ == [4]
    by_layer = {r["layers"][0]: r["auroc_mean"] for r in new.selector_.cv_results_}
    assert by_layer[2] < 0.6 < 0.7 < by_layer[4]
    # calibration and threshold come from the leave-one-topic-out scores
    assert np.isfinite(new.oof_prob_).all()
    assert (new.oof_prob_[t.y == 0] >= new.threshold_).mean() <= 0.10 + 1e-9


def test_topic_balance_alone_removes_the_topic_from_the_fit(leak_table) -> None:
    """Fitted on the topic layer only, a topic-balanced probe has (almost) nothing to use;
    a globally balanced one scores the topic."""
    t = leak_table
    spans = np.arange(t.n_spans)
    from probes.train import _fit_tokens, span_logits

    res = {}
    for balance in (False, True):
        probe = _fit_tokens(t, spans, [2], "own", 0.1, 2000, topic_balance=balance)
        z = span_logits(probe, t, spans, [2], "own")
        from sklearn.metrics import roc_auc_score

        res[balance] = roc_auc_score(t.y, z)
    assert res[False] > 0.75 and res[True] < 0.65


def test_selection_falls_back_to_entities_with_one_topic(own_table, caplog) -> None:
    t = own_table
    spans = np.flatnonzero(t.domains == "alpha")  # one topic: nothing to leave out
    with caplog.at_level("WARNING"):
        sel = ProbeSelector(Cs=[0.1], cv_folds=3, concat_top=0, score_positions=["own"],
                            progress=False).fit(t, spans)
    assert sel.cv_scheme_ == "entities" and len(sel.folds_) == 3
    assert "entity-grouped" in caplog.text


def test_cross_topic_reports_within_topic_auroc(own_table) -> None:
    t = own_table
    res = cross_topic(t, np.arange(t.n_spans), layers=[4], position="own", C=0.1,
                      topic_balance=True)
    for r in res.values():
        assert r["within_topic"]["probe"] > 0.85
        assert {"neg_min_logprob", "neg_mean_logprob", "mean_entropy"} <= set(r["within_topic"])


def test_protocol_comparison_runs_offline(own_capture: Path, tmp_path: Path) -> None:
    from probes.protocols import main

    out = tmp_path / "protocols.json"
    assert main(["--capture", str(own_capture), "--out", str(out), "--Cs", "0.1",
                 "--candidate-layers", "2,4", "--positions", "own", "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res["protocols"]) == {"old", "new", "hybrid"}
    assert res["protocols"]["old"]["selected"]["cv_scheme"] == "entities"
    assert res["protocols"]["new"]["selected"]["cv_scheme"] == "topics"
    assert res["protocols"]["hybrid"]["config"]["token_features"] == ["logprob", "entropy"]
    for r in res["protocols"].values():
        assert r["selected"]["layers"] == [4]
        assert set(r["cross_domain"]) == {"alpha", "beta", "gamma"}
        assert r["heldout"]["probe"] > 0.9
    assert "| held-out domain |" in out.with_suffix(".md").read_text()


def test_selection_never_ranks_by_undefined_fold_scores(leak_table, caplog) -> None:
    """Each topic answered all right or all wrong: no held-out topic has both classes, so
    every fold score is undefined. Selection must not take the first configuration (what
    it did while ranking NaN fold means); it ranks by pooled out-of-fold AUROC and says so."""
    import dataclasses

    t = leak_table
    keys = balance_topics(t)
    topics = sorted(set(keys.tolist()))
    fabricated = {k for i, k in enumerate(topics) if i % 2}
    t = dataclasses.replace(t, y=np.isin(keys, list(fabricated)).astype(t.y.dtype))
    spans = np.arange(t.n_spans)
    sel = ProbeSelector(Cs=[0.1], concat_top=0, cv_scheme="topics", progress=False)
    with caplog.at_level("WARNING"):
        sel.fit(t, spans)
    assert all(not np.isfinite(r["auroc_mean"]) for r in sel.cv_results_)
    best_oof = max(r["auroc_oof"] for r in sel.cv_results_)
    assert sel.best_["auroc_oof"] == pytest.approx(best_oof)
    assert sel.selection_score_ == "auroc_oof"
    assert "pooled out-of-fold AUROC" in caplog.text
