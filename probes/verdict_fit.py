"""Fit a claim verdict (:class:`detector.verdict.VerdictModel`) from out-of-fold claims.

Every input is out of fold: the probe's scores come from probes that never saw the claim's
topic (``ProbeSelector``'s leave-one-out folds), so the references, the calibration and the
operating points describe the probe as it behaves on topics it was not trained on, which
is what serving meets. Token log-probabilities need no fold (nothing is fitted to them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from detector.ranks import midranks
from detector.verdict import MAX_REFERENCE, OperatingPoint, VerdictModel
from probes.linear import threshold_for_fpr

logger = logging.getLogger(__name__)

OPERATING_FPRS = (0.01, 0.02, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
PROBE_WEIGHTS = (0.25, 0.4, 0.5, 0.6, 0.75)  # candidates for the probe's share of the fusion
CALIBRATION_POINTS = 101
SIGNALS = ("probe", "neg_min_logprob")


def reference_quantiles(values: np.ndarray, n: int = MAX_REFERENCE) -> list[float]:
    """At most ``n`` evenly spaced quantiles of the finite ``values`` (sorted)."""
    v = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
    if v.size < 2:
        raise ValueError(f"a reference needs at least 2 finite values, got {v.size}")
    if v.size > n:
        v = np.quantile(v, np.linspace(0.0, 1.0, n))
    return [float(x) for x in v]


def fit_verdict(y: np.ndarray, signals: np.ndarray, *, weights: Sequence[float] = (0.5, 0.5),
                target_fpr: float = 0.10, fprs: Sequence[float] = OPERATING_FPRS,
                names: Sequence[str] = SIGNALS, groups: np.ndarray | None = None
                ) -> VerdictModel:
    """``y`` (1 = fabrication) and ``(n, len(names))`` out-of-fold claim signals -> a verdict.

    The calibration is isotonic on the fused rank (made strictly increasing by a slope of
    1e-6 so that a threshold on the probability is a threshold on the rank), sampled at
    ``CALIBRATION_POINTS``. Each operating point's threshold flags its rate of retrieval
    claims in the typical ``groups`` (domains): the median over groups of their rates, so
    a few domains whose correct answers all score high do not set the threshold for every
    other one (pooled, they did: the threshold chosen for 10% flagged about 1% on unseen
    topics). Without groups, or with fewer than 3, the pooled rate."""
    y = np.asarray(y, dtype=np.int64)
    signals = np.asarray(signals, dtype=np.float64).reshape(len(y), len(names))
    if not 0 < y.sum() < len(y):
        raise ValueError("fitting a verdict needs claims of both classes")
    grid = np.linspace(0.0, 1.0, CALIBRATION_POINTS)
    base = VerdictModel(
        signals=list(names), weights=[float(w) for w in weights],
        reference=[reference_quantiles(signals[:, j]) for j in range(len(names))],
        calibration_x=list(grid), calibration_y=list(grid),
        operating_points=[OperatingPoint(target_fpr=target_fpr, threshold=0.5)],
        target_fpr=target_fpr)
    fused = base.fused(signals)
    ok = np.isfinite(fused)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    iso.fit(fused[ok], y[ok])
    cal = np.clip(iso.predict(grid) * (1 - 1e-6) + 1e-6 * grid, 0.0, 1.0)
    calibrated = base.model_copy(update={"calibration_y": [float(v) for v in cal]})
    prob = calibrated.calibrate(fused)
    neg, pos = prob[ok & (y == 0)], prob[ok & (y == 1)]
    neg_groups = None
    if groups is not None:
        g = np.asarray(groups)[ok & (y == 0)]
        if len(set(g.tolist())) >= 3:
            neg_groups = g
    points = []
    for rate in sorted(set(float(f) for f in fprs) | {float(target_fpr)}):
        thr = (threshold_for_fpr(neg, rate) if neg_groups is None
               else median_group_threshold(neg, neg_groups, rate))
        thr = float(min(max(thr, 1e-6), 1.0))
        points.append(OperatingPoint(target_fpr=rate, threshold=thr,
                                     oof_fpr=float((neg >= thr).mean()),
                                     oof_recall=float((pos >= thr).mean())))
    # A higher rate never needs a higher threshold (keeps interpolation monotone).
    for i in range(1, len(points)):
        if points[i].threshold > points[i - 1].threshold:
            points[i] = points[i].model_copy(update={"threshold": points[i - 1].threshold})
    model = VerdictModel.model_validate({**calibrated.model_dump(),
                                         "operating_points": [p.model_dump() for p in points]})
    logger.info("verdict: %s weights %s, out-of-fold AUROC %.3f (%s); threshold %.4f at "
                "%.0f%% false flags", "+".join(names), list(weights),
                roc_auc_score(y[ok], fused[ok]),
                ", ".join(f"{n} {_auroc(y, signals[:, j]):.3f}" for j, n in enumerate(names)),
                model.threshold_for(), 100 * target_fpr)
    return model


def median_group_threshold(neg: np.ndarray, groups: np.ndarray, rate: float) -> float:
    """The smallest threshold at which the median over groups of the flagged share of
    each group's negatives is at most ``rate``."""
    neg = np.asarray(neg, dtype=np.float64)
    keys = sorted(set(groups.tolist()))
    per_group = [np.sort(neg[groups == k]) for k in keys]

    def median_rate(thr: float) -> float:
        return float(np.median([1.0 - np.searchsorted(s, thr, side="left") / len(s)
                                for s in per_group]))

    candidates = np.unique(np.concatenate([[np.nextafter(np.float32(v), np.float32(np.inf))
                                            for v in neg], [neg.min()]]))
    for thr in candidates:  # ascending: the first that meets the rate flags the most
        if median_rate(float(thr)) <= rate:
            return float(thr)
    return float(candidates[-1])


def choose_probe_weight(y: np.ndarray, signals: np.ndarray, groups: np.ndarray, *,
                        candidates: Sequence[float] = PROBE_WEIGHTS
                        ) -> tuple[float, dict[str, float]]:
    """The probe's weight in the fusion with the best mean within-group AUROC of the fused
    out-of-fold ranks (groups: domains; within a group, so a domain's base rate cannot
    choose), ties to the weight nearest 0.5; with the score of every candidate."""
    y = np.asarray(y)
    ranks = np.c_[[_midranks(signals[:, j]) for j in range(signals.shape[1])]].T
    scores: dict[str, float] = {}
    for w in candidates:
        fused = w * ranks[:, 0] + (1.0 - w) * ranks[:, 1]
        per = [_auroc(y[groups == g], fused[groups == g]) for g in sorted(set(groups.tolist()))]
        per = [a for a in per if np.isfinite(a)]
        scores[f"{w:g}"] = float(np.mean(per)) if per else float("nan")
    best = max(candidates, key=lambda w: (np.nan_to_num(scores[f"{w:g}"], nan=-1.0),
                                          -abs(w - 0.5)))
    return float(best), scores


def _midranks(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return np.nan_to_num(midranks(v, np.sort(v[np.isfinite(v)])), nan=0.5)


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    ok = np.isfinite(s)
    return float(roc_auc_score(y[ok], s[ok])) if 0 < y[ok].sum() < ok.sum() else float("nan")


__all__ = ["OPERATING_FPRS", "PROBE_WEIGHTS", "SIGNALS", "choose_probe_weight", "fit_verdict",
           "median_group_threshold", "reference_quantiles"]
