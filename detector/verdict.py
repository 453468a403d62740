"""The claim verdict: every signal the engine has about a claim, fused by rank, calibrated.

A claim is judged on two signals, each aggregated over the claim's tokens:

* ``probe``: the residual-stream probe's calibrated probability (the claim score a probe
  without a verdict model serves, :func:`detector.claims.aggregate` of its tokens);
* ``neg_min_logprob``: minus the lowest log-probability the model gave one of the claim's
  tokens (the free baseline every detector must beat).

Why ranks and not a fitted linear mix of the raw scores: on topics a probe never saw, both
scores shift in scale from domain to domain, and a weighted sum fitted on training topics
leans on whichever scale training favoured. The rank of each signal against a fixed
reference distribution (its quantile among training claims) moves much less, and the
two signals are complementary (they correlate weakly on unseen domains, FIELD-NOTES).
The fused rank is then mapped to a probability by an isotonic calibration fitted on
out-of-fold claims, and the threshold for a target false-flag rate comes from a table of
operating points measured on claims of domains held out of each fold, so an operator
picks the rate at serve time without retraining.

Training (``probes.verdict_fit``) builds a :class:`VerdictModel`; the sidecar
(``detector.sidecar.spans``) and offline evaluation both call :meth:`claim_probability`:
one definition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

from detector.ranks import midranks

Signal = Literal["probe", "neg_min_logprob"]
SIGNALS: tuple[str, ...] = get_args(Signal)
# Token features the engine must compute for a signal (``detector.engine.token_features``).
SIGNAL_TOKEN_FEATURES: dict[str, tuple[str, ...]] = {"probe": (), "neg_min_logprob": ("logprob",)}
MAX_REFERENCE = 1025  # quantiles kept per signal; plenty for a rank, small in probe.json
MAX_CALIBRATION = 1025


class OperatingPoint(BaseModel):
    """A threshold on the verdict's probability and what it did on held-out-domain claims."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_fpr: float = Field(gt=0.0, lt=1.0)
    threshold: float = Field(gt=0.0, le=1.0)
    oof_fpr: float | None = Field(default=None, ge=0.0, le=1.0)
    oof_recall: float | None = Field(default=None, ge=0.0, le=1.0)


class VerdictModel(BaseModel):
    """Rank fusion of claim signals plus calibration and operating points (``probe.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signals: list[Signal] = Field(min_length=1)
    weights: list[FiniteFloat] = Field(min_length=1)
    # Per signal: sorted values of that signal over the reference claims (its quantiles).
    reference: list[list[FiniteFloat]] = Field(min_length=1)
    # Fused rank (in [0, 1]) -> probability of fabrication, piecewise linear.
    calibration_x: list[FiniteFloat] = Field(min_length=2, max_length=MAX_CALIBRATION)
    calibration_y: list[FiniteFloat] = Field(min_length=2, max_length=MAX_CALIBRATION)
    operating_points: list[OperatingPoint] = Field(min_length=1, max_length=64)
    target_fpr: float = Field(gt=0.0, lt=1.0)  # the shipped operating point

    @model_validator(mode="after")
    def _check(self) -> VerdictModel:
        n = len(self.signals)
        if len(set(self.signals)) != n:
            raise ValueError(f"signals must be unique, got {self.signals}")
        if len(self.weights) != n or len(self.reference) != n:
            raise ValueError(f"{n} signals need {n} weights and {n} references, got "
                             f"{len(self.weights)} and {len(self.reference)}")
        if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        for name, ref in zip(self.signals, self.reference):
            if not 2 <= len(ref) <= MAX_REFERENCE:
                raise ValueError(f"reference of {name!r} needs 2..{MAX_REFERENCE} values, "
                                 f"got {len(ref)}")
            if any(b < a for a, b in zip(ref, ref[1:])):
                raise ValueError(f"reference of {name!r} must be sorted")
        x, y = self.calibration_x, self.calibration_y
        if len(x) != len(y):
            raise ValueError("calibration_x and calibration_y differ in length")
        if any(b <= a for a, b in zip(x, x[1:])) or any(b < a for a, b in zip(y, y[1:])):
            raise ValueError("calibration must be increasing in x and non-decreasing in y")
        if not all(0.0 <= v <= 1.0 for v in y):
            raise ValueError("calibration_y must lie in [0, 1]")
        targets = [p.target_fpr for p in self.operating_points]
        if targets != sorted(set(targets)):
            raise ValueError("operating points must have sorted, unique target_fpr")
        return self

    @property
    def token_features(self) -> list[str]:
        """Token features the engine must compute for this verdict."""
        return sorted({f for s in self.signals for f in SIGNAL_TOKEN_FEATURES[s]})

    # ------------------------------------------------------------------ scoring

    def ranks(self, values: np.ndarray) -> np.ndarray:
        """``(n, len(signals))`` raw signals -> their mid-ranks in [0, 1] against the
        reference (NaN stays NaN: a signal the claim lacks)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1, len(self.signals))
        out = np.full(values.shape, np.nan)
        for j, ref in enumerate(self.reference):
            out[:, j] = midranks(values[:, j], ref)
        return out

    def fused(self, values: np.ndarray) -> np.ndarray:
        """Weighted mean of the signals' ranks over those the claim has (NaN if none)."""
        ranks = self.ranks(values)
        w = np.asarray(self.weights, dtype=np.float64)[None, :] * np.isfinite(ranks)
        total = w.sum(axis=1)
        num = np.nansum(np.nan_to_num(ranks) * w, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, num / np.where(total > 0, total, 1.0), np.nan)

    def calibrate(self, fused: np.ndarray) -> np.ndarray:
        fused = np.asarray(fused, dtype=np.float64)
        return np.interp(fused, self.calibration_x, self.calibration_y)

    def probabilities(self, values: np.ndarray) -> np.ndarray:
        """``(n, len(signals))`` raw signals -> calibrated probabilities of fabrication."""
        return self.calibrate(self.fused(values))

    def claim_probability(self, signals: Mapping[str, float]) -> float:
        """One claim's probability from its signals by name (missing or NaN: left out)."""
        row = [[float(signals.get(s, math.nan)) for s in self.signals]]
        return float(self.probabilities(np.asarray(row))[0])

    def threshold_for(self, target_fpr: float | None = None) -> float:
        """The threshold for a false-flag rate: the operating point's, interpolated between
        the measured ones (clamped at the ends of the table)."""
        target = self.target_fpr if target_fpr is None else float(target_fpr)
        if not 0.0 < target < 1.0:
            raise ValueError(f"target false-flag rate must be in (0, 1), got {target}")
        xs = [p.target_fpr for p in self.operating_points]
        ys = [p.threshold for p in self.operating_points]
        return float(np.interp(target, xs, ys))


def claim_signals(probe_scores: Sequence[float], logprobs: Sequence[float], how: str
                  ) -> dict[str, float]:
    """A claim's raw signals from its tokens: the probe's aggregated score and minus the
    lowest finite token log-probability (NaN when the engine sent none)."""
    from detector.claims import aggregate

    finite = [v for v in logprobs if math.isfinite(v)]
    return {"probe": aggregate(probe_scores, how) if len(probe_scores) else math.nan,
            "neg_min_logprob": -min(finite) if finite else math.nan}


__all__ = ["SIGNALS", "SIGNAL_TOKEN_FEATURES", "OperatingPoint", "Signal", "VerdictModel",
           "claim_signals"]
