"""Metrics and claim labelling of the served held-out evaluation (``benchmarks/heldout.py``).

Pure functions over plain arrays, kept apart from the code that talks to servers so they
can be tested on known inputs:

- :func:`auroc` (rank-based, ties averaged) and :func:`bootstrap_aurocs`: AUROC of each
  scorer with 95% intervals from a bootstrap that resamples *entities* (the questions about
  one country are not independent), plus the probe-minus-baseline difference;
- :func:`verdict_metrics`: what a client sees at the shipped threshold;
- :func:`logprob_baselines`: the free baselines on exactly the tokens of a served claim.

A long-form claim is labelled by :func:`probes.labeling.label_longform_claim`, the rule
training uses too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from detector.engine.token_features import entropy_of

SCORERS = ("probe", "neg_min_logprob", "neg_mean_logprob", "mean_entropy")
BASELINE = "neg_min_logprob"


# ----------------------------------------------------------------------------- AUROC
def auroc(y: Sequence[int] | np.ndarray, s: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of scores ``s`` for labels ``y`` (1 = fabrication); ties
    count one half; NaN when a class is missing."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=float)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=float)
    sorted_s = s[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def _interval(values: list[float], point: float) -> dict[str, float | None]:
    vals = np.asarray([v for v in values if math.isfinite(v)])
    if not vals.size or not math.isfinite(point):
        return {"point": None if not math.isfinite(point) else point, "lo": None, "hi": None}
    return {"point": point, "lo": float(np.percentile(vals, 2.5)),
            "hi": float(np.percentile(vals, 97.5))}


def bootstrap_aurocs(y: Sequence[int], scores: Mapping[str, Sequence[float]],
                     groups: Sequence[str], *, n_boot: int = 1000, seed: int = 0,
                     baseline: str = BASELINE) -> dict[str, object]:
    """AUROC of every scorer with a 95% entity-bootstrap interval, and ``probe - baseline``.

    Items with a non-finite score for any scorer are left out, so every scorer is measured
    on the same items. Returns ``{"n", "n_fabrication", "n_retrieval", "n_entities",
    "auroc": {scorer: {point, lo, hi}}, "probe_minus_baseline": {point, lo, hi},
    "baseline": baseline}``.
    """
    y_arr = np.asarray(y, dtype=int)
    mat = np.vstack([np.asarray(scores[k], dtype=float) for k in scores]) if scores else \
        np.zeros((0, y_arr.size))
    keep = np.all(np.isfinite(mat), axis=0) if mat.size else np.ones(y_arr.size, bool)
    y_arr, mat = y_arr[keep], mat[:, keep]
    g = np.asarray(groups)[keep]
    names = list(scores)
    out: dict[str, object] = {"n": int(y_arr.size), "n_fabrication": int(y_arr.sum()),
                              "n_retrieval": int(y_arr.size - y_arr.sum()),
                              "n_entities": int(len(set(g.tolist()))),
                              "n_dropped_nan": int((~keep).sum()), "baseline": baseline}
    points = {k: auroc(y_arr, mat[i]) for i, k in enumerate(names)}
    uniq, inverse = np.unique(g, return_inverse=True) if g.size else (np.array([]), g)
    members = [np.flatnonzero(inverse == j) for j in range(len(uniq))]
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {k: [] for k in names}
    diffs: list[float] = []
    if len(uniq) >= 2 and n_boot > 0 and 0 < y_arr.sum() < y_arr.size:
        for _ in range(n_boot):
            pick = np.concatenate([members[j] for j in rng.integers(0, len(uniq), len(uniq))])
            yy = y_arr[pick]
            vals = {k: auroc(yy, mat[i][pick]) for i, k in enumerate(names)}
            for k, v in vals.items():
                boots[k].append(v)
            if "probe" in vals and baseline in vals:
                diffs.append(vals["probe"] - vals[baseline])
    out["auroc"] = {k: _interval(boots[k], points[k]) for k in names}
    if "probe" in points and baseline in points:
        out["probe_minus_baseline"] = _interval(diffs, points["probe"] - points[baseline])
    return out


# ----------------------------------------------------------------------------- verdicts
def _share(num: int, den: int) -> float | None:
    return num / den if den else None


def verdict_metrics(labels: Sequence[str], flagged: Sequence[bool]) -> dict[str, object]:
    """At the shipped threshold, over answers labelled retrieval or fabrication:
    ``false_flag_rate`` = correct answers with a flagged claim, ``recall`` = fabricated
    answers caught, ``precision`` = flagged answers that are fabricated."""
    ret = [f for lab, f in zip(labels, flagged) if lab == "retrieval"]
    fab = [f for lab, f in zip(labels, flagged) if lab == "fabrication"]
    tp, fp = sum(fab), sum(ret)
    return {"answers": len(ret) + len(fab), "retrieval": len(ret), "fabrication": len(fab),
            "false_flag_rate": _share(fp, len(ret)), "recall": _share(tp, len(fab)),
            "precision": _share(tp, tp + fp), "flagged": tp + fp}


# ----------------------------------------------------------------------------- baselines
def logprob_baselines(logprobs: Sequence[float | None], tops: Sequence[Sequence[float]],
                      t0: int, t1: int) -> dict[str, float]:
    """The baselines on generated tokens ``[t0, t1)`` (higher = more likely fabricated);
    NaN when a token in the range has no log-probability."""
    nan = float("nan")
    if t1 <= t0 or t1 > len(logprobs):
        return {"neg_min_logprob": nan, "neg_mean_logprob": nan, "mean_entropy": nan}
    lps = [logprobs[i] for i in range(t0, t1)]
    if any(v is None or not math.isfinite(v) for v in lps):
        return {"neg_min_logprob": nan, "neg_mean_logprob": nan, "mean_entropy": nan}
    # Every alternative the reply gave (k=None): the API may add the chosen token to its 20.
    ents = [entropy_of(tops[i], None) if i < len(tops) else nan for i in range(t0, t1)]
    return {"neg_min_logprob": -float(min(lps)), "neg_mean_logprob": -float(np.mean(lps)),
            "mean_entropy": float(np.mean(ents))}


def numeric(x: object) -> float:
    """A JSON-safe float (NaN stays NaN for computation; see :func:`finite_or_none`)."""
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


__all__ = [
    "BASELINE",
    "SCORERS",
    "auroc",
    "bootstrap_aurocs",
    "finite_or_none",
    "logprob_baselines",
    "numeric",
    "verdict_metrics",
]
