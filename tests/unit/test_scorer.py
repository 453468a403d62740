"""FusedProbeScorer: one GEMM must equal each probe applied on its own, calibration included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detector.artifact import ProbeArtifact, ProbeArtifactError, ProbeMetadata, ProbeMismatchError
from detector.model_identity import ModelIdentity
from detector.sidecar.scorer import FusedProbeScorer

H = 32
CAPTURED = [2, 4, 6, 9]
MODEL = ModelIdentity(name="tiny", fingerprint="0123456789abcdef", hidden_size=H, num_layers=12)


def make_probe(
    name: str,
    layers: list[int],
    *,
    seed: int,
    calibration: str = "none",
    standardise: bool = True,
    platt: tuple[float, float] = (1.3, -0.4),
    knots: tuple[list[float], list[float]] | None = None,
    threshold: float = 0.5,
    score_position: str = "producer",
) -> ProbeArtifact:
    g = torch.Generator().manual_seed(seed)
    d = len(layers) * H
    extra = {"platt_a": platt[0], "platt_b": platt[1]} if calibration == "platt" else {}
    iso = {}
    if calibration == "isotonic":
        iso = {
            name: torch.tensor([float(v) for v in values], dtype=torch.float32)
            for name, values in zip(("isotonic_x", "isotonic_y"), knots)
        }
    meta = ProbeMetadata(
        name=name,
        model=MODEL,
        layers=layers,
        hidden_size=H,
        score_position=score_position,
        calibration=calibration,
        threshold=threshold,
        **extra,
    )
    return ProbeArtifact(
        metadata=meta,
        weight=torch.randn(d, generator=g) / d**0.5,
        bias=torch.randn(1, generator=g),
        mean=torch.randn(d, generator=g) if standardise else None,
        scale=(torch.rand(d, generator=g) + 0.5) if standardise else None,
        **iso,
    )


def naive_logit(rows: torch.Tensor, probe: ProbeArtifact) -> torch.Tensor:
    """x[layer rows] . w + b for one probe, unfolded and in float64."""
    x = torch.cat([rows[CAPTURED.index(k)] for k in probe.metadata.layers], dim=1).double()
    if probe.mean is not None:
        x = x - probe.mean.double()
    if probe.scale is not None:
        x = x / probe.scale.double()
    return x @ probe.weight.double() + probe.bias.double()


@pytest.fixture
def probes() -> list[ProbeArtifact]:
    return [
        make_probe("single", [4], seed=1),
        make_probe("pair", [2, 9], seed=2, calibration="platt", score_position="own"),
        make_probe("triple", [4, 6, 9], seed=3, standardise=False, threshold=0.8),
        make_probe("all", CAPTURED, seed=4, calibration="isotonic",
                   knots=([-1.0, 0.0, 0.5, 2.0], [0.05, 0.3, 0.3, 0.95])),  # fmt: skip
    ]


@pytest.fixture
def rows() -> torch.Tensor:
    return torch.randn(len(CAPTURED), 57, H, generator=torch.Generator().manual_seed(0))


def test_fused_logits_equal_per_probe(probes: list[ProbeArtifact], rows: torch.Tensor) -> None:
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    logits = scorer.logits(rows)
    assert logits.shape == (57, 4) and logits.dtype == torch.float32
    for j, probe in enumerate(probes):
        np.testing.assert_allclose(logits[:, j].double(), naive_logit(rows, probe), atol=1e-5, rtol=0)


def test_block_matrix_layout(probes: list[ProbeArtifact]) -> None:
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    w = scorer.weight.view(len(CAPTURED), H, len(probes))
    assert scorer.weight.shape == (len(CAPTURED) * H, len(probes))
    for j, probe in enumerate(probes):
        for i, layer in enumerate(CAPTURED):
            assert bool(w[i, :, j].any()) == (layer in probe.metadata.layers)
    assert scorer.unused_layers == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_row_dtypes(probes: list[ProbeArtifact], rows: torch.Tensor, dtype: torch.dtype) -> None:
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    low = rows.to(dtype)
    expected = scorer.logits(low.float())
    got = scorer.logits(low)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_non_contiguous_rows(probes: list[ProbeArtifact], rows: torch.Tensor) -> None:
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    strided = torch.randn(len(CAPTURED), 2 * 57, H)[:, ::2]
    torch.testing.assert_close(scorer.logits(strided), scorer.logits(strided.contiguous()))


def test_platt_probabilities_match_formula(probes: list[ProbeArtifact], rows: torch.Tensor) -> None:
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    z = scorer.logits(rows)
    p = scorer.probabilities(z)
    a, b = probes[1].metadata.platt_a, probes[1].metadata.platt_b
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-(a * z[:, 1].double().numpy() + b))), atol=1e-6)
    np.testing.assert_allclose(p[:, 0], 1 / (1 + np.exp(-z[:, 0].double().numpy())), atol=1e-6)
    np.testing.assert_allclose(p[:, 2], 1 / (1 + np.exp(-z[:, 2].double().numpy())), atol=1e-6)


def test_isotonic_matches_numpy_interp() -> None:
    """Several isotonic probes with different knot counts, mixed with a platt one."""
    knot_sets = [
        ([-1.0, 0.0, 0.5, 2.0], [0.05, 0.3, 0.3, 0.95]),
        ([-0.2, 0.7], [0.1, 0.6]),
        ([0.3], [0.4]),  # one knot: a constant
        (list(np.linspace(-3, 3, 17)), list(np.linspace(0, 1, 17) ** 2)),
    ]
    probes = [make_probe("platt", [4], seed=0, calibration="platt")]
    probes += [
        make_probe(f"iso{i}", [6], seed=i + 1, calibration="isotonic", knots=k)
        for i, k in enumerate(knot_sets)
    ]
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    grid = torch.linspace(-5, 5, 401)
    # include every knot exactly, and values past both ends (clamped)
    extra = torch.tensor([v for x, _ in knot_sets for v in x], dtype=torch.float32)
    z = torch.cat([grid, extra]).unsqueeze(1).repeat(1, len(probes))
    p = scorer.probabilities(z)
    for j, (x, y) in enumerate(knot_sets, start=1):
        xf = np.asarray(x, dtype=np.float32).astype(np.float64)
        yf = np.asarray(y, dtype=np.float32).astype(np.float64)
        np.testing.assert_allclose(p[:, j].double(), np.interp(z[:, j].double(), xf, yf), atol=1e-6)
    a, b = probes[0].metadata.platt_a, probes[0].metadata.platt_b
    z0 = z[:, 0].double().numpy()
    np.testing.assert_allclose(p[:, 0].double(), 1 / (1 + np.exp(-(a * z0 + b))), atol=1e-6)


def test_properties(probes: list[ProbeArtifact]) -> None:
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    assert scorer.probe_names == ["single", "pair", "triple", "all"]
    assert scorer.score_positions == ["producer", "own", "producer", "producer"]
    torch.testing.assert_close(scorer.thresholds, torch.tensor([0.5, 0.5, 0.8, 0.5]))
    assert scorer.thresholds.dtype == torch.float32
    assert scorer.num_probes == 4


def test_zero_probes_and_zero_tokens(rows: torch.Tensor, probes: list[ProbeArtifact]) -> None:
    empty = FusedProbeScorer([], captured_layers=CAPTURED, hidden_size=H, device="cpu")
    assert empty.logits(rows).shape == (57, 0)
    assert empty.probabilities(empty.logits(rows)).shape == (57, 0)
    assert empty.thresholds.shape == (0,)
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    none = scorer.logits(rows[:, :0])
    assert none.shape == (0, 4)
    assert scorer.probabilities(none).shape == (0, 4)


def test_unused_layers_reported() -> None:
    scorer = FusedProbeScorer(
        [make_probe("p", [6], seed=0)], captured_layers=CAPTURED, hidden_size=H, device="cpu"
    )
    assert scorer.unused_layers == [2, 4, 9]


def test_refusals(probes: list[ProbeArtifact], rows: torch.Tensor) -> None:
    with pytest.raises(ProbeMismatchError, match=r"layers \[9\] that are not captured.*LIE_DETECTOR_LAYERS"):
        FusedProbeScorer(probes, captured_layers=[2, 4, 6], hidden_size=H, device="cpu")
    with pytest.raises(ProbeMismatchError, match="hidden size 32"):
        FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=64, device="cpu")
    with pytest.raises(ProbeArtifactError, match=r"duplicated: \['single'\]"):
        FusedProbeScorer(probes + probes[:1], captured_layers=CAPTURED, hidden_size=H, device="cpu")
    other = MODEL.model_copy(update={"fingerprint": "ffffffffffffffff"})
    with pytest.raises(ProbeMismatchError, match="fingerprint"):
        FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu", model=other)
    FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu", model=MODEL)
    scorer = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    with pytest.raises(ValueError, match="rows must have shape"):
        scorer.logits(rows[:3])
    with pytest.raises(ValueError, match="logits must have shape"):
        scorer.probabilities(torch.zeros(5, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(probes: list[ProbeArtifact], rows: torch.Tensor) -> None:
    cpu = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cpu")
    gpu = FusedProbeScorer(probes, captured_layers=CAPTURED, hidden_size=H, device="cuda")
    for src in (rows, rows.cuda().bfloat16()):
        got = gpu.score(src)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), cpu.score(src.cpu()), atol=1e-5, rtol=0)
