"""What a probe was trained on, and whether a served row lies outside it (drift).

A probe's verdict is only as good as the resemblance between the rows it scores and the
rows it was fitted on; on a topic, style or model use it never saw, a confident score can
mean nothing (issue 22: a probe "right at home and blind abroad"). Each probe can ship a
:class:`DriftSummary` of its training rows (the rows of its own layers, concatenated, as
the scorer reads them), and the sidecar says per row whether it lies outside.

The statistic (classic PCA process monitoring, Hotelling T^2 and Q/SPE):

* ``mean`` (D,) and ``directions`` (k, D): the training rows' mean and top-k principal
  directions (orthonormal), ``component_std`` (k,) their spread along each;
* ``t2 = sum_i (v_i . (x - mean) / std_i)^2``: how far the row is *inside* the subspace
  the training rows span, in units of their own spread;
* ``residual = |x - mean|^2 - sum_i (v_i . (x - mean))^2``: the energy *outside* that
  subspace, what the training rows' main directions cannot explain.

A row is outside when either exceeds its limit, the 99th percentile of the statistic on
training rows held out from the PCA fit (so ``expected_outside_rate``, measured on them,
is about 2% on rows like the training ones). Why this one: both parts are linear in the
row up to a square, so the sidecar gets them from k + 1 extra columns of the fused GEMM
it already runs (``x . v_i`` and ``x . mean``) plus each layer's ``|x|^2``: no second
pass over the probe's weights and nothing per token kept beyond one flag; T^2 catches a
row that is unusual along the directions the training data varied in, the residual
catches one that moves in directions it never varied in (a new domain, a new style, a
model quirk), which a Mahalanobis distance on k directions alone would miss and a full
covariance (D x D) would cost too much to ship and apply.

What it is not: a judgement of correctness. A row inside the training distribution can be
a fabrication the probe misses, and a row outside can be scored right; it says only that
the probe's calibration was not measured on rows like these. A response is reported
out of distribution when more than :data:`OOD_RESPONSE_FRACTION` of its scored rows lie
outside: single outside rows are expected (about 2% by construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

# Tensors a probe with a drift summary carries in probe.safetensors.
DRIFT_TENSORS = ("drift_mean", "drift_directions")
# A response whose scored rows lie outside the probe's training distribution more often
# than this is reported out of distribution. Half: far above the ~2% of rows like the
# training ones, and a majority, so a few odd tokens (a code block, a name in another
# script) in an ordinary answer do not trip it.
OOD_RESPONSE_FRACTION = 0.5
MAX_COMPONENTS = 64
# Directions must be orthonormal to this tolerance (float32 storage rounds them).
_ORTHO_TOL = 1e-3


class DriftSummary(BaseModel):
    """``probe.json``'s ``drift``: the scalars of the training-distribution summary (its
    tensors, ``drift_mean`` and ``drift_directions``, are in ``probe.safetensors``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    components: int = Field(ge=1, le=MAX_COMPONENTS)
    component_std: list[FiniteFloat]
    t2_limit: FiniteFloat = Field(gt=0.0)
    residual_limit: FiniteFloat = Field(ge=0.0)
    quantile: FiniteFloat = Field(0.99, gt=0.5, lt=1.0)
    # Fraction of held-out training rows outside (either limit exceeded).
    expected_outside_rate: FiniteFloat = Field(ge=0.0, le=1.0)
    # Training rows the summary was fitted on, and those its limits were measured on.
    rows: int = Field(ge=1)
    calibration_rows: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> DriftSummary:
        if len(self.component_std) != self.components:
            raise ValueError(f"component_std has {len(self.component_std)} values, "
                             f"components is {self.components}")
        # Positive and finite in float32 (the scorer's products are float32).
        with np.errstate(over="ignore"):
            std = np.asarray(self.component_std, np.float32)
            limits = np.asarray([self.t2_limit, self.residual_limit], np.float32)
        if not (np.all(std > 0) and np.all(np.isfinite(std))):
            raise ValueError("component_std must be positive and finite in float32")
        if not np.all(np.isfinite(limits)):
            raise ValueError("t2_limit and residual_limit must be finite in float32")
        return self


def check_drift_tensors(summary: DriftSummary, mean: np.ndarray, directions: np.ndarray,
                        dim: int, row_bound: float) -> str | None:
    """Why the tensors do not fit the summary (None when they do): shapes, a mean within
    ``row_bound`` and orthonormal directions, so the statistics stay finite."""
    k = summary.components
    if mean.shape != (dim,):
        return f"tensor 'drift_mean' has shape {mean.shape}, expected ({dim},)"
    if directions.shape != (k, dim):
        return f"tensor 'drift_directions' has shape {directions.shape}, expected ({k}, {dim})"
    if not np.all(np.abs(mean) <= row_bound):
        return f"tensor 'drift_mean' has values beyond +-{row_bound:g}"
    gram = directions.astype(np.float64) @ directions.astype(np.float64).T
    if not np.all(np.isfinite(gram)) or np.abs(gram - np.eye(k)).max() > _ORTHO_TOL:
        return "tensor 'drift_directions' is not orthonormal (rows must be unit, orthogonal)"
    return None


def drift_statistics(x: np.ndarray, mean: np.ndarray, directions: np.ndarray,
                     std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(t2, residual) per row of ``x`` (n, D), in float64: the reference the scorer's fused
    computation is tested against, and what training calibrates the limits on."""
    c = np.asarray(x, np.float64) - np.asarray(mean, np.float64)
    t = c @ np.asarray(directions, np.float64).T
    t2 = ((t / np.asarray(std, np.float64)) ** 2).sum(1)
    residual = np.maximum((c * c).sum(1) - (t * t).sum(1), 0.0)
    return t2, residual


def outside(t2: np.ndarray, residual: np.ndarray, summary: DriftSummary) -> np.ndarray:
    """Whether each row lies outside the summary (either statistic above its limit)."""
    return (np.asarray(t2) > summary.t2_limit) | (np.asarray(residual) > summary.residual_limit)


@dataclass(frozen=True, slots=True)
class ResponseDrift:
    """One probe's drift over a response: how many of its scored rows lie outside."""

    probe: str
    rows: int
    rows_outside: int

    @property
    def fraction(self) -> float:
        return self.rows_outside / self.rows if self.rows else 0.0

    @property
    def out_of_distribution(self) -> bool:
        return self.rows > 0 and self.fraction > OOD_RESPONSE_FRACTION


def response_drift(flags: Sequence[dict[str, bool]]) -> list[ResponseDrift]:
    """Per probe with a drift summary (a probe absent from every token's flags has none),
    the rows counted over the tokens' per-row flags, in order of first appearance."""
    rows: dict[str, list[int]] = {}
    for token in flags:
        for name, out in token.items():
            counts = rows.setdefault(name, [0, 0])
            counts[0] += 1
            counts[1] += bool(out)
    return [ResponseDrift(name, n, k) for name, (n, k) in rows.items()]


__all__ = [
    "DRIFT_TENSORS",
    "OOD_RESPONSE_FRACTION",
    "DriftSummary",
    "ResponseDrift",
    "check_drift_tensors",
    "drift_statistics",
    "outside",
    "response_drift",
]
