"""Fit a probe's training-distribution summary (:mod:`detector.drift`) on its rows.

The principal directions are fitted on one part of the training rows and the limits (99th
percentiles of T^2 and of the residual) measured on the other: measured on the rows the
PCA was fitted on, the residual limit would be too tight and rows like the training ones
would be reported outside far more often than the quantile says. Rows are split by group
(question) when groups are given, since rows of one answer resemble each other.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from detector.artifact import ProbeArtifact
from detector.drift import DriftSummary, drift_statistics, outside
from probes.spans import SpanTable

logger = logging.getLogger(__name__)

MIN_ROWS = 16  # fewer training rows than this: no summary (its limits would mean nothing)
# More rows than this are subsampled: enough for 8 directions and a 99th percentile, and a
# large model's concatenated layers (n x 3 x 4096 float32) stay within memory.
MAX_ROWS = 20_000


@dataclasses.dataclass(frozen=True)
class FittedDrift:
    summary: DriftSummary
    mean: np.ndarray  # (D,) float32
    directions: np.ndarray  # (k, D) float32, orthonormal rows


def fit_drift(x: np.ndarray, *, groups: np.ndarray | None = None, components: int = 8,
              quantile: float = 0.99, calibration_fraction: float = 0.3, seed: int = 0
              ) -> FittedDrift | None:
    """Summary of rows ``x`` (n, D); None (logged) when there are too few rows."""
    x = np.asarray(x, dtype=np.float32)
    n, dim = x.shape
    if n < MIN_ROWS:
        logger.warning("drift summary skipped: %d training rows (at least %d needed)", n,
                       MIN_ROWS)
        return None
    rng = np.random.default_rng(seed)
    keys = np.asarray(groups) if groups is not None and len(groups) == n else np.arange(n)
    unique = np.unique(keys)
    held = rng.permutation(unique)[: max(1, int(round(calibration_fraction * unique.size)))]
    cal: np.ndarray = np.isin(keys, held)
    if cal.all() or (~cal).sum() < components + 2:  # too few groups to split: split rows
        cal = np.asarray(rng.random(n) < calibration_fraction)
    if not cal.any() or (~cal).sum() < 2:
        cal = np.ones(n, dtype=bool)  # tiny data: limits measured on the fitted rows
    fit_rows = x[~cal] if (~cal).sum() >= 2 else x
    mean = fit_rows.astype(np.float64).mean(0)
    centered = torch.from_numpy((fit_rows - mean).astype(np.float32))
    k = int(min(components, fit_rows.shape[0] - 1, dim))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, s, v = torch.svd_lowrank(centered, q=min(k + 8, *centered.shape), niter=4)
    directions = v[:, :k].T.contiguous().double()
    # Re-orthonormalise in float64 (svd_lowrank's float32 basis drifts a little).
    q, _ = torch.linalg.qr(directions.T)
    directions = (q.T * torch.sign((q.T * directions).sum(1, keepdim=True))).numpy()
    spread = float(s[0]) / np.sqrt(max(fit_rows.shape[0] - 1, 1)) if s.numel() else 1.0
    std = (s[:k].double().numpy() / np.sqrt(max(fit_rows.shape[0] - 1, 1)))
    std = np.maximum(std, max(spread, 1e-12) * 1e-6)
    t2, residual = drift_statistics(x[cal], mean, directions, std)
    t2_limit = max(float(np.quantile(t2, quantile)), 1e-12)
    residual_limit = float(np.quantile(residual, quantile))
    summary = DriftSummary(components=k, component_std=[float(v) for v in std],
                           t2_limit=t2_limit, residual_limit=residual_limit, quantile=quantile,
                           expected_outside_rate=0.0, rows=int(fit_rows.shape[0]),
                           calibration_rows=int(cal.sum()))
    rate = float(outside(t2, residual, summary).mean())
    summary = summary.model_copy(update={"expected_outside_rate": rate})
    logger.info("drift summary: %d components over %d rows (limits on %d held-out rows: "
                "%.1f%% outside)", k, summary.rows, summary.calibration_rows, 100 * rate)
    return FittedDrift(summary, mean.astype(np.float32), directions.astype(np.float32))


def fit_table_drift(table: SpanTable, spans: np.ndarray, layers: Sequence[int],
                    **kwargs: Any) -> FittedDrift | None:
    """Summary of the rows a probe on ``layers`` reads for the training ``spans``: the rows
    of both positions of their tokens (the scorer reports on every generated row it scores,
    which includes the rows just before claims), grouped by question."""
    tokens = table.token_index(spans)
    rows = np.concatenate([table.producer_row[tokens], table.own_row[tokens]])
    groups = np.concatenate([table.groups[table.token_span[tokens]]] * 2)
    rows, first = np.unique(rows, return_index=True)
    if rows.size > MAX_ROWS:
        keep = np.sort(np.random.default_rng(kwargs.get("seed", 0)).choice(
            rows.size, MAX_ROWS, replace=False))
        rows, first = rows[keep], first[keep]
    li = [table.layers.index(k) for k in layers]
    x = table.rows[rows][:, li, :].reshape(len(rows), -1).astype(np.float32)
    return fit_drift(x, groups=groups[first], **kwargs)


def with_drift(art: ProbeArtifact, fitted: FittedDrift | None) -> ProbeArtifact:
    """The artifact with the summary attached (unchanged when there is none)."""
    if fitted is None:
        return art
    return dataclasses.replace(
        art, metadata=art.metadata.model_copy(update={"drift": fitted.summary}),
        drift_mean=torch.from_numpy(fitted.mean.copy()),
        drift_directions=torch.from_numpy(fitted.directions.copy()))
