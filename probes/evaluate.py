"""Span-level metrics, and the baselines a probe must beat, on the same spans.

Scores are oriented so that higher means "more likely fabricated":

* ``probe``: max over the span's tokens of the probe's (calibrated) probability;
* ``neg_min_logprob`` / ``neg_mean_logprob``: minus the min / mean log-probability of the
  span's generated tokens (vLLM's ``logprobs``);
* ``mean_entropy``: mean per-token entropy of the next-token distribution, computed over
  the top-k (k = 20) alternatives vLLM returns, renormalised to sum to one (the full
  distribution is not returned, so this is a lower bound on the true entropy);
* ``random_direction``: a control: the max over tokens of the projection on a random
  direction in the probe's standardised feature space, its sign chosen on the training
  spans; averaged over many directions, it should sit near 0.5.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from probes.spans import ScorePosition, SpanTable, neg_min_logprob

logger = logging.getLogger(__name__)

BASELINES = ("neg_min_logprob", "neg_mean_logprob", "mean_entropy")
DEFAULT_FPR = 0.10


class Metrics(BaseModel):
    """Span-level metrics of one scorer on one set of spans (NaN where undefined)."""

    model_config = ConfigDict(frozen=True)

    n: int
    n_fabrication: int
    n_retrieval: int
    auroc: float
    auprc: float
    recall_at_fpr: float
    fpr: float = DEFAULT_FPR
    ece: float | None = None


def recall_at_fpr(y: np.ndarray, score: np.ndarray, fpr: float = DEFAULT_FPR) -> float:
    """Highest true-positive rate at a threshold whose false-positive rate is <= ``fpr``."""
    y = np.asarray(y).astype(bool)
    if y.all() or (~y).all():
        return float("nan")
    f, t, _ = roc_curve(y, score)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of |mean(prob) - mean(y)| x bin weight."""
    y = np.asarray(y, dtype=np.float64)
    prob = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    if y.size == 0:
        return float("nan")
    which = np.minimum((prob * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(prob[mask].mean() - y[mask].mean())
    return float(total)


def span_metrics(y: np.ndarray, score: np.ndarray, *, prob: np.ndarray | None = None,
                 fpr: float = DEFAULT_FPR) -> Metrics:
    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=np.float64)
    keep = np.isfinite(score)
    if not keep.all():
        logger.debug("dropping %d spans with undefined scores", int((~keep).sum()))
    y_k, s_k = y[keep], score[keep]
    both = 0 < y_k.sum() < y_k.size
    return Metrics(
        n=int(y_k.size),
        n_fabrication=int(y_k.sum()),
        n_retrieval=int((1 - y_k).sum()),
        auroc=float(roc_auc_score(y_k, s_k)) if both else float("nan"),
        auprc=float(average_precision_score(y_k, s_k)) if both else float("nan"),
        recall_at_fpr=recall_at_fpr(y_k, s_k, fpr) if both else float("nan"),
        fpr=fpr,
        ece=expected_calibration_error(y_k, prob[keep]) if prob is not None else None,
    )


def baseline_scores(table: SpanTable, spans: np.ndarray) -> dict[str, np.ndarray]:
    """Per-span scores of the logit-based baselines (higher = more likely fabricated)."""
    spans = np.asarray(spans, dtype=np.int64)
    out: dict[str, list[float]] = {"neg_mean_logprob": [], "mean_entropy": []}
    for s in spans:
        a, k = int(table.token_start[s]), int(table.token_count[s])
        lp = table.logprobs[a:a + k]
        ent = table.entropies[a:a + k]
        lp, ent = lp[np.isfinite(lp)], ent[np.isfinite(ent)]
        out["neg_mean_logprob"].append(float(-lp.mean()) if lp.size else float("nan"))
        out["mean_entropy"].append(float(ent.mean()) if ent.size else float("nan"))
    return {"neg_min_logprob": neg_min_logprob(table, spans),
            **{k: np.asarray(v, dtype=np.float64) for k, v in out.items()}}


def random_direction_scores(
    table: SpanTable, train: np.ndarray, test: np.ndarray, *, layers: Sequence[int],
    position: ScorePosition, n_directions: int = 20, seed: int = 0,
) -> list[np.ndarray]:
    """Test-span scores of ``n_directions`` random probes (the control)."""
    rng = np.random.default_rng(seed)
    x_train = table.features(train, layers, position)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0
    z_train = (x_train - mean) / std
    z_test = (table.features(test, layers, position) - mean) / std
    y_train = table.y[np.asarray(train)]
    out = []
    for _ in range(n_directions):
        w = rng.normal(size=z_train.shape[1])
        w /= np.linalg.norm(w)
        s_train = table.span_max(train, z_train @ w)
        sign = 1.0
        if 0 < y_train.sum() < y_train.size and roc_auc_score(y_train, s_train) < 0.5:
            sign = -1.0
            s_train = table.span_max(train, -(z_train @ w))
        out.append(table.span_max(test, sign * (z_test @ w)))
    return out


def compare_on_spans(table: SpanTable, spans: np.ndarray, probe_prob: np.ndarray, *,
                     random_scores: list[np.ndarray] | None = None, fpr: float = DEFAULT_FPR
                     ) -> dict[str, Any]:
    """Probe, baselines and (optionally) the random control on the same spans."""
    spans = np.asarray(spans, dtype=np.int64)
    y = table.y[spans]
    out: dict[str, Any] = {"probe": span_metrics(y, probe_prob, prob=probe_prob, fpr=fpr)}
    for name, score in baseline_scores(table, spans).items():
        out[name] = span_metrics(y, score, fpr=fpr)
    if random_scores:
        aurocs = [span_metrics(y, s, fpr=fpr).auroc for s in random_scores]
        out["random_direction"] = {"auroc_mean": float(np.nanmean(aurocs)),
                                   "auroc_std": float(np.nanstd(aurocs)),
                                   "auroc_max": float(np.nanmax(aurocs)),
                                   "n_directions": len(aurocs)}
    return out


def bootstrap_auroc_gap(y: np.ndarray, a: np.ndarray, b: np.ndarray, groups: np.ndarray, *,
                        n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same spans, with a 95% interval from resampling entities.

    Entities (not spans) are resampled because the spans of one entity are correlated.
    """
    y = np.asarray(y).astype(int)
    keep = np.isfinite(a) & np.isfinite(b)
    y, a, b, groups = y[keep], np.asarray(a)[keep], np.asarray(b)[keep], np.asarray(groups)[keep]
    uniq, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(uniq))]
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(n_boot):
        pick = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        yy = y[pick]
        if 0 < yy.sum() < yy.size:
            gaps.append(roc_auc_score(yy, a[pick]) - roc_auc_score(yy, b[pick]))
    point = roc_auc_score(y, a) - roc_auc_score(y, b) if 0 < y.sum() < y.size else float("nan")
    if not gaps:
        return {"gap": float(point), "ci95_low": float("nan"), "ci95_high": float("nan")}
    lo, hi = np.percentile(gaps, [2.5, 97.5])
    return {"gap": float(point), "ci95_low": float(lo), "ci95_high": float(hi),
            "n_boot": len(gaps)}


def best_baseline(results: dict[str, Any]) -> tuple[str, float]:
    """The baseline with the highest AUROC in a :func:`compare_on_spans` result."""
    scored = [(name, results[name].auroc) for name in BASELINES
              if name in results and np.isfinite(results[name].auroc)]
    if not scored:
        return "none", float("nan")
    return max(scored, key=lambda kv: kv[1])


__all__ = [
    "BASELINES",
    "DEFAULT_FPR",
    "Metrics",
    "baseline_scores",
    "best_baseline",
    "bootstrap_auroc_gap",
    "compare_on_spans",
    "expected_calibration_error",
    "random_direction_scores",
    "recall_at_fpr",
    "span_metrics",
]
