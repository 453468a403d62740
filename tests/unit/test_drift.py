"""Drift: a probe's training-distribution summary (detector.drift), fitted in training
(probes.drift_fit), shipped in the artifact and computed by the sidecar's fused scorer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from detector.artifact import ProbeArtifact, ProbeArtifactError, ProbeMetadata, load_probe
from detector.drift import OOD_RESPONSE_FRACTION, drift_statistics, outside, response_drift
from detector.model_identity import ModelIdentity
from detector.sidecar.scorer import FusedProbeScorer
from probes.drift_fit import fit_drift, with_drift

H = 16
MODEL = ModelIdentity(name="tiny", fingerprint="00ff00ff00ff00ff", hidden_size=H, num_layers=6)


def rows_from(basis: np.ndarray, n: int, seed: int, *, noise: float = 0.1,
              offset: float = 1.0) -> np.ndarray:
    """Rows like a residual stream: a few latent directions, small isotropic noise."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, basis.shape[0])) @ basis * 2.0
            + rng.normal(size=(n, basis.shape[1])) * noise + offset).astype(np.float32)


def basis(dim: int, rank: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rank, dim))


def probe(name: str, layers: list[int], *, drift_rows: np.ndarray | None = None,
          seed: int = 0) -> ProbeArtifact:
    g = torch.Generator().manual_seed(seed)
    meta = ProbeMetadata(name=name, model=MODEL, layers=layers, hidden_size=H,
                         score_position="producer", calibration="none", threshold=0.5)
    art = ProbeArtifact(metadata=meta, weight=torch.randn(len(layers) * H, generator=g),
                        bias=torch.tensor([0.1]))
    return with_drift(art, fit_drift(drift_rows, components=4)) if drift_rows is not None else art


def test_rows_like_the_training_ones_are_inside_and_shifted_ones_outside() -> None:
    home, abroad = basis(2 * H, 4, 1), basis(2 * H, 4, 2)
    fitted = fit_drift(rows_from(home, 2000, 0), components=4)
    assert fitted is not None
    s = fitted.summary
    assert s.components == 4 and s.rows + s.calibration_rows == 2000
    assert 0.0 < s.expected_outside_rate < 0.05
    same = outside(*drift_statistics(rows_from(home, 1000, 7), fitted.mean, fitted.directions,
                                     s.component_std), s)
    shifted = outside(*drift_statistics(rows_from(abroad, 1000, 8), fitted.mean,
                                        fitted.directions, s.component_std), s)
    # A mean shift along the training directions alone is caught by T^2.
    far = rows_from(home, 1000, 9) + 6.0 * fitted.directions[0] * s.component_std[0]
    moved = outside(*drift_statistics(far, fitted.mean, fitted.directions, s.component_std), s)
    assert same.mean() < 0.05
    assert shifted.mean() > 0.95 and moved.mean() > 0.9


def test_too_few_rows_give_no_summary() -> None:
    assert fit_drift(np.zeros((5, H), np.float32)) is None


def test_artifact_round_trip_and_old_probes(tmp_path) -> None:
    art = probe("p", [1, 3], drift_rows=rows_from(basis(2 * H, 4, 1), 500, 0))
    loaded = load_probe(art.save(tmp_path / "p"))
    assert loaded.metadata.drift == art.metadata.drift
    assert torch.equal(loaded.drift_mean, art.drift_mean)
    assert torch.equal(loaded.drift_directions, art.drift_directions)
    old = load_probe(probe("old", [1]).save(tmp_path / "old"))
    assert old.metadata.drift is None and old.drift_directions is None


def _tamper(tmp_path, *, meta=None, tensors=None) -> ProbeArtifactError:
    art = probe("p", [1], drift_rows=rows_from(basis(H, 4, 1), 500, 0))
    d = art.save(tmp_path / "p", overwrite=True)
    if meta is not None:
        doc = json.loads((d / "probe.json").read_text())
        meta(doc)
        (d / "probe.json").write_text(json.dumps(doc))
    if tensors is not None:
        t = load_file(str(d / "probe.safetensors"))
        tensors(t)
        save_file(t, str(d / "probe.safetensors"))
    with pytest.raises(ProbeArtifactError) as info:
        load_probe(d)
    return info.value


@pytest.mark.parametrize("change, reason", [
    (lambda t: t["drift_mean"].__setitem__(0, float("nan")), "NaN"),
    (lambda t: t["drift_mean"].__setitem__(0, 1e30), "beyond"),
    (lambda t: t["drift_directions"].mul_(3.0), "orthonormal"),
    (lambda t: t.__setitem__("drift_directions", t["drift_directions"][:2].contiguous()),
     "shape"),
    (lambda t: t.__setitem__("drift_mean", t["drift_mean"].double()), "float64"),
    (lambda t: t.pop("drift_directions"), "needs tensor"),
])
def test_hostile_drift_tensors_are_refused(tmp_path, change, reason) -> None:
    assert reason in str(_tamper(tmp_path, tensors=change))


@pytest.mark.parametrize("change, reason", [
    (lambda d: d["drift"].__setitem__("component_std", [1.0, -1.0, 1.0, 1.0]), "positive"),
    (lambda d: d["drift"].__setitem__("component_std", [1.0]), "component_std has"),
    (lambda d: d["drift"].__setitem__("t2_limit", 1e300), "finite in float32"),
    (lambda d: d["drift"].__setitem__("surprise", 1), "drift.surprise"),
    (lambda d: d.pop("drift"), "no drift summary"),
])
def test_hostile_drift_metadata_is_refused(tmp_path, change, reason) -> None:
    assert reason in str(_tamper(tmp_path, meta=change))


def test_scorer_drift_equals_the_numpy_reference() -> None:
    """Two probes with summaries on different layers beside one without: the fused GEMM's
    statistics equal the float64 reference, flags follow the limits, logits are untouched."""
    captured = [1, 3, 4]
    a = probe("a", [1, 4], drift_rows=rows_from(basis(2 * H, 4, 1), 600, 0), seed=1)
    b = probe("b", [3], drift_rows=rows_from(basis(H, 4, 2), 600, 1), seed=2)
    plain = probe("plain", [3], seed=3)
    scorer = FusedProbeScorer([a, plain, b], captured_layers=captured, hidden_size=H,
                              device="cpu")
    alone = FusedProbeScorer([a, plain, b][1:2], captured_layers=captured, hidden_size=H,
                             device="cpu")
    assert scorer.has_drift and not alone.has_drift
    rng = np.random.default_rng(5)
    # 40 rows like each probe's training rows (layers 1 and 4 like a's, 3 like b's), 40 not.
    a_rows, b_rows = rows_from(basis(2 * H, 4, 1), 40, 3), rows_from(basis(H, 4, 2), 40, 4)
    inside = np.stack([a_rows[:, :H], b_rows, a_rows[:, H:]], 1)
    rows = torch.from_numpy(np.concatenate([inside, rng.normal(size=(40, 3, H)) * 3 + 1])
                            .astype(np.float32).transpose(1, 0, 2).copy())
    logits, flags = scorer.logits_and_drift(rows)
    assert torch.equal(logits, scorer.logits(rows))
    assert torch.allclose(logits[:, 1], alone.logits(rows)[:, 0], atol=1e-5)
    assert torch.isnan(flags[:, 1]).all()
    t2, residual = scorer.drift_statistics(rows)
    x = rows.transpose(0, 1).numpy()
    for c, (col, art) in enumerate([(0, a), (2, b)]):
        layers = [captured.index(k) for k in art.metadata.layers]
        xs = x[:, layers, :].reshape(80, -1)
        s = art.metadata.drift
        ref_t2, ref_res = drift_statistics(xs, art.drift_mean.numpy(),
                                           art.drift_directions.numpy(), s.component_std)
        np.testing.assert_allclose(t2[:, c].numpy(), ref_t2, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(residual[:, c].numpy(), ref_res, rtol=1e-4,
                                   atol=1e-4 * float((xs ** 2).sum(1).max()))
        ref = outside(ref_t2, ref_res, s)
        clear = (np.abs(ref_t2 / s.t2_limit - 1) > 1e-3) & (
            np.abs(ref_res - s.residual_limit) > 1e-3 * max(s.residual_limit, 1.0))
        np.testing.assert_array_equal(flags[clear, col].numpy() > 0.5, ref[clear])
        assert 0 < ref.sum() < 80  # both kinds of rows present


def test_response_drift_counts_rows_per_probe() -> None:
    flags = [{"a": True}, {"a": True, "b": False}, {"a": False, "b": False}, {}]
    got = {d.probe: d for d in response_drift(flags)}
    assert (got["a"].rows, got["a"].rows_outside) == (3, 2)
    assert got["a"].out_of_distribution and got["a"].fraction > OOD_RESPONSE_FRACTION
    assert not got["b"].out_of_distribution and got["b"].fraction == 0.0


def test_training_ships_a_summary_that_held_out_rows_fit(tmp_path) -> None:
    """FabricationProbeTrainer (what train, train-probe and train-default run) fits the
    summary on the training spans' rows; held-out spans of the same capture fall inside."""
    from probes.spans import load_span_table
    from probes.store import CaptureStore
    from probes.synthetic import SYNTHETIC_MODEL, make_synthetic_capture
    from probes.train import FabricationProbeTrainer, TrainConfig, grouped_holdout

    table = load_span_table(CaptureStore.open(make_synthetic_capture(tmp_path / "cap")))
    train, test = grouped_holdout(table.y, table.groups, 0.25, seed=0)
    config = TrainConfig(layers=[4], score_positions=["own"], Cs=[0.1], cv_folds=3,
                         concat_top=0)
    trainer = FabricationProbeTrainer(config=config, progress=False).fit(table, train)
    art = load_probe(trainer.to_artifact(name="syn", model=SYNTHETIC_MODEL, training={})
                     .save(tmp_path / "probe"))
    s = art.metadata.drift
    assert s is not None and art.drift_directions.shape == (s.components, table.hidden_size)
    assert s.rows + s.calibration_rows >= table.token_index(train).size
    x = table.features(test, [4], "own")
    stats = drift_statistics(x, art.drift_mean.numpy(), art.drift_directions.numpy(),
                             s.component_std)
    assert outside(*stats, s).mean() < 0.1


def test_the_openai_field_carries_the_drift() -> None:
    from detector.serving.client import Drift, RequestState, Scores
    from detector.serving.openai_middleware import annotation

    scores = Scores(request_id="r", engine_request_id="r-1", state=RequestState.FINISHED,
                    incomplete_reason="", num_prompt_tokens=3, probes=("p",), tokens=(),
                    spans=(), text="x", verdicts=(), requests_with_id=1,
                    drift=(Drift("p", 10, 8, 0.8, True),))
    field = annotation(scores, "x")
    assert field["out_of_distribution"] is True
    assert field["drift"] == [{"probe": "p", "rows": 10, "rows_outside": 8,
                               "outside_fraction": 0.8, "out_of_distribution": True}]


def test_a_hybrid_probe_with_a_summary_scores_as_without_one() -> None:
    """The drift columns share the product with the probes' own: adding token features to
    the hybrid columns afterwards still gives the same logits as a probe without drift."""
    meta = ProbeMetadata(name="h", model=MODEL, layers=[3], hidden_size=H,
                         score_position="producer", calibration="none", threshold=0.5,
                         token_features=["logprob"])
    art = ProbeArtifact(metadata=meta, weight=torch.randn(H + 1, generator=torch.Generator()
                                                          .manual_seed(4)), bias=torch.zeros(1))
    summarised = with_drift(art, fit_drift(rows_from(basis(H, 4, 2), 300, 0), components=4))
    kw = dict(captured_layers=[1, 3], hidden_size=H, device="cpu")
    plain, drifting = FusedProbeScorer([art], **kw), FusedProbeScorer([summarised], **kw)
    rows = torch.randn(2, 12, H)
    feats = torch.randn(12, 1)
    feats[3] = float("nan")
    want = plain.logits(rows, producer_features=feats)
    got, flags = drifting.logits_and_drift(rows, producer_features=feats)
    torch.testing.assert_close(got, want, equal_nan=True)
    assert flags is not None and flags.shape == (12, 1) and not torch.isnan(flags).any()
    assert drifting.logits_and_drift(rows[:, :0])[1].shape == (0, 1)
