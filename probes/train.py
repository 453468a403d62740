"""Train a fabrication probe: choose layer, score position and C by grouped CV, calibrate.

Protocol (all splits grouped by entity, so no entity is on both sides):

1. the caller holds out test entities (:func:`grouped_holdout`);
2. on the training spans, :class:`ProbeSelector` runs stratified group k-fold CV over
   every candidate layer x score position (screened at one C, then the C grid on the best
   few, then the best layers concatenated), with token-level targets (each token of a
   span carries the span's label, tokens weighted so that every span counts once) and
   span-level scoring (max over the span's token logits, as the sidecar aggregates); it
   keeps the configuration with the best mean fold AUROC;
3. :class:`FabricationProbeTrainer` fits that configuration on all training tokens,
   calibrates span scores on the out-of-fold span logits of step 2 (Platt by default),
   and picks the threshold that flags at most ``target_fpr`` of the out-of-fold
   retrieval spans.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from detector.artifact import ProbeArtifact
from detector.model_identity import ModelIdentity
from probes.linear import LinearProbe, threshold_for_fpr
from probes.spans import SCORE_POSITIONS, ScorePosition, SpanTable

logger = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Everything that decides which probe comes out (recorded in the artifact)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("fabrication", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    layers: list[int] | None = None  # candidate layers; None = every captured layer
    score_positions: list[ScorePosition] = Field(default_factory=lambda: list(SCORE_POSITIONS))
    Cs: list[float] = Field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0])
    # Screen every layer x position at this C, then try the whole grid on the best few
    # (None: the full grid everywhere; ~4x the fits, large C is the slow part).
    screen_C: float | None = 0.01
    refine_top: int = Field(3, ge=1)
    concat_top: int = Field(2, ge=0, le=8)  # also try the best k layers concatenated
    # "span": every span weighs the same whatever its token count; "token": every token.
    token_weighting: Literal["span", "token"] = "span"
    cv_folds: int = Field(5, ge=2)
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    calibration: Literal["none", "platt", "isotonic"] = "platt"
    target_fpr: float = Field(0.10, gt=0.0, lt=1.0)
    max_iter: int = Field(2000, ge=10)
    seed: int = 0
    n_random_directions: int = Field(20, ge=1)
    cross_topic: bool = True


def grouped_holdout(y: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Span indices (train, test): ~``test_fraction`` of the groups, stratified by label."""
    n_splits = max(2, int(round(1.0 / test_fraction)))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train, test = next(splitter.split(np.zeros(len(y)), y, groups))
    return np.sort(train), np.sort(test)


def grouped_folds(table: SpanTable, spans: np.ndarray, n_folds: int, seed: int
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified group k-fold over ``spans`` (indices into the table)."""
    spans = np.asarray(spans, dtype=np.int64)
    n_groups = len(np.unique(table.groups[spans]))
    k = min(n_folds, n_groups)
    if k < 2:
        raise ValueError(f"need at least 2 entity groups for cross-validation, have {n_groups}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(spans[np.sort(a)], spans[np.sort(b)]) for a, b in
            splitter.split(np.zeros(len(spans)), table.y[spans], table.groups[spans])]


def _fit_tokens(table: SpanTable, spans: np.ndarray, layers: Sequence[int],
                position: ScorePosition, C: float, max_iter: int,
                calibration: str = "none", x: np.ndarray | None = None,
                weighting: str = "span") -> LinearProbe:
    """Token-level fit: every token of a span carries the span's label."""
    x = table.features(spans, layers, position) if x is None else x
    probe = LinearProbe(C=C, max_iter=max_iter, calibration=calibration)  # type: ignore[arg-type]
    weights = table.token_weights(spans) if weighting == "span" else None
    return probe.fit(x, table.token_labels(spans), sample_weight=weights)


def span_logits(probe: LinearProbe, table: SpanTable, spans: np.ndarray,
                layers: Sequence[int], position: ScorePosition) -> np.ndarray:
    """Max over each span's tokens of the probe's logit."""
    return table.span_max(spans, probe.decision_function(table.features(spans, layers, position)))


def _safe_auroc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")


class ProbeSelector(BaseEstimator):
    """Grouped CV over layers x score positions x C; learned: ``cv_results_``, ``best_``."""

    def __init__(self, *, layers: Sequence[int] | None = None,
                 score_positions: Sequence[ScorePosition] = SCORE_POSITIONS,
                 Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0), screen_C: float | None = None,
                 refine_top: int = 3, concat_top: int = 2, token_weighting: str = "span",
                 cv_folds: int = 5, max_iter: int = 2000, seed: int = 0,
                 progress: bool = True) -> None:
        self.layers = layers
        self.score_positions = score_positions
        self.Cs = Cs
        self.screen_C = screen_C
        self.refine_top = refine_top
        self.concat_top = concat_top
        self.token_weighting = token_weighting
        self.cv_folds = cv_folds
        self.max_iter = max_iter
        self.seed = seed
        self.progress = progress

    def fit(self, table: SpanTable, spans: np.ndarray) -> ProbeSelector:
        spans = np.asarray(spans, dtype=np.int64)
        layers = list(self.layers) if self.layers else list(table.layers)
        unknown = sorted(set(layers) - set(table.layers))
        if unknown:
            raise ValueError(f"candidate layers {unknown} were not captured ({table.layers})")
        self.folds_ = grouped_folds(table, spans, self.cv_folds, self.seed)
        self.cv_results_: list[dict[str, Any]] = []
        self._oof: dict[tuple, np.ndarray] = {}
        configs = [((k,), pos) for pos in self.score_positions for k in layers]
        t0 = time.monotonic()
        n_folds = len(self.folds_)
        screen = [self.screen_C] if self.screen_C is not None else list(self.Cs)
        bar = tqdm(total=len(configs) * len(screen) * n_folds, desc="cv", unit="fit",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for cfg_layers, pos in configs:  # stage 1: every layer and row
                self._evaluate(table, spans, cfg_layers, pos, screen, bar)
            if self.screen_C is not None:  # stage 2: the C grid on the best few
                rest = [c for c in self.Cs if float(c) != float(self.screen_C)]
                ranked = sorted(self.cv_results_, key=lambda r: -np.nan_to_num(r["auroc_mean"]))
                for r in ranked[: self.refine_top]:
                    bar.total += len(rest) * n_folds
                    self._evaluate(table, spans, tuple(r["layers"]), r["position"], rest, bar)
            if self.concat_top >= 2 and len(layers) >= 2:  # stage 3: best layers together
                lead = self._best_single()
                pos = lead["position"]
                top = tuple(sorted(self._layer_ranking(pos)[: self.concat_top]))
                bar.total += n_folds
                self._evaluate(table, spans, top, pos, [lead["C"]], bar)
        finally:
            bar.close()
        best = max(self.cv_results_, key=lambda r: (np.nan_to_num(r["auroc_mean"], nan=-1),
                                                   -len(r["layers"])))
        # Prefer a single layer unless concatenation is clearly better.
        best_single = self._best_single()
        if len(best["layers"]) > 1 and best["auroc_mean"] - best_single["auroc_mean"] < 0.005:
            best = best_single
        self.best_ = dict(best)
        logger.info("CV (%d folds, %.0f s): best %s position, layers %s, C=%g: AUROC %.3f +- %.3f",
                    len(self.folds_), time.monotonic() - t0, best["position"], best["layers"],
                    best["C"], best["auroc_mean"], best["auroc_std"])
        return self

    def _best_single(self) -> dict[str, Any]:
        singles = [r for r in self.cv_results_ if len(r["layers"]) == 1]
        return max(singles, key=lambda r: np.nan_to_num(r["auroc_mean"], nan=-1))

    def _evaluate(self, table: SpanTable, spans: np.ndarray, layers: tuple[int, ...],
                  pos: ScorePosition, Cs: Sequence[float], bar: Any) -> None:
        x_all = table.features(spans, layers, pos)
        token_owner = np.repeat(np.arange(len(spans)), table.token_count[spans])
        index_of = {int(s): i for i, s in enumerate(spans)}
        for C in Cs:
            oof = np.full(len(spans), np.nan)
            fold_aurocs = []
            for train, val in self.folds_:
                tr_mask = np.isin(token_owner, [index_of[int(s)] for s in train])
                probe = _fit_tokens(table, train, layers, pos, C, self.max_iter,
                                    x=x_all[tr_mask], weighting=self.token_weighting)
                val_idx = np.array([index_of[int(s)] for s in val])
                va_mask = np.isin(token_owner, val_idx)
                z = table.span_max(val, probe.decision_function(x_all[va_mask]))
                oof[val_idx] = z
                fold_aurocs.append(_safe_auroc(table.y[val], z))
                bar.update()
            self._oof[(layers, pos, C)] = oof
            self.cv_results_.append({
                "layers": list(layers), "position": pos, "C": float(C),
                "auroc_mean": float(np.nanmean(fold_aurocs)),
                "auroc_std": float(np.nanstd(fold_aurocs)),
                "auroc_oof": _safe_auroc(table.y[spans], oof),
                "fold_aurocs": [float(a) for a in fold_aurocs],
            })

    def _layer_ranking(self, pos: ScorePosition) -> list[int]:
        per_layer: dict[int, float] = {}
        for r in self.cv_results_:
            if r["position"] == pos and len(r["layers"]) == 1:
                k = r["layers"][0]
                per_layer[k] = max(per_layer.get(k, -1.0), np.nan_to_num(r["auroc_mean"], nan=-1))
        return sorted(per_layer, key=lambda k: -per_layer[k])

    def oof_logits(self, layers: Sequence[int], position: str, C: float) -> np.ndarray:
        check_is_fitted(self, "best_")
        return self._oof[(tuple(layers), position, float(C))]


class FabricationProbeTrainer(BaseEstimator):
    """Selects, fits, calibrates and thresholds a fabrication probe on training spans."""

    def __init__(self, *, config: TrainConfig | None = None, progress: bool = True) -> None:
        self.config = config
        self.progress = progress

    def fit(self, table: SpanTable, spans: np.ndarray) -> FabricationProbeTrainer:
        cfg = self.config or TrainConfig()
        spans = np.asarray(spans, dtype=np.int64)
        self.selector_ = ProbeSelector(
            layers=cfg.layers, score_positions=cfg.score_positions, Cs=cfg.Cs,
            screen_C=cfg.screen_C, refine_top=cfg.refine_top, concat_top=cfg.concat_top,
            token_weighting=cfg.token_weighting, cv_folds=cfg.cv_folds, max_iter=cfg.max_iter,
            seed=cfg.seed, progress=self.progress,
        ).fit(table, spans)
        best = self.selector_.best_
        self.layers_ = [int(k) for k in best["layers"]]
        self.position_: ScorePosition = best["position"]
        self.C_ = float(best["C"])
        self.probe_ = _fit_tokens(table, spans, self.layers_, self.position_, self.C_,
                                  cfg.max_iter, calibration=cfg.calibration,
                                  weighting=cfg.token_weighting)
        oof = self.selector_.oof_logits(self.layers_, self.position_, self.C_)
        ok = np.isfinite(oof)
        self.probe_.recalibrate(oof[ok], table.y[spans][ok].astype(bool))
        self.oof_prob_ = self.probe_.calibrate(oof)
        negatives = self.oof_prob_[ok & (table.y[spans] == 0)]
        threshold = threshold_for_fpr(negatives, cfg.target_fpr)
        self.threshold_ = float(min(max(threshold, 1e-6), 1.0 - 1e-6))
        self.train_spans_ = spans
        logger.info("probe: layers %s, %s position, C=%g, %s calibration, threshold %.4f "
                    "(<= %.0f%% out-of-fold retrieval spans flagged)", self.layers_,
                    self.position_, self.C_, cfg.calibration, self.threshold_,
                    100 * cfg.target_fpr)
        return self

    def span_proba(self, table: SpanTable, spans: np.ndarray) -> np.ndarray:
        """Calibrated span probability of fabrication (max over the span's tokens)."""
        check_is_fitted(self, "probe_")
        return self.probe_.calibrate(span_logits(self.probe_, table, spans, self.layers_,
                                                 self.position_))

    def to_artifact(self, *, name: str, model: ModelIdentity, training: dict[str, Any]
                    ) -> ProbeArtifact:
        check_is_fitted(self, "probe_")
        return self.probe_.to_artifact(name=name, model=model, layers=self.layers_,
                                       score_position=self.position_, threshold=self.threshold_,
                                       training=training)


def cross_topic(table: SpanTable, spans: np.ndarray, *, layers: Sequence[int],
                position: ScorePosition, C: float, max_iter: int = 2000,
                key: Literal["domains", "topics"] = "domains", token_weighting: str = "span",
                ) -> dict[str, dict[str, Any]]:
    """Train on every other domain, test on one; the probe's and baselines' span scores."""
    from probes.evaluate import compare_on_spans

    spans = np.asarray(spans, dtype=np.int64)
    values = getattr(table, key)[spans]
    out: dict[str, dict[str, Any]] = {}
    for held in sorted(set(values.tolist())):
        test, train = spans[values == held], spans[values != held]
        if not (0 < table.y[test].sum() < len(test)) or not (0 < table.y[train].sum() < len(train)):
            logger.info("cross-topic: skipping %s (one class only)", held)
            continue
        probe = _fit_tokens(table, train, layers, position, C, max_iter,
                            weighting=token_weighting)
        z = span_logits(probe, table, test, layers, position)
        prob = 1.0 / (1.0 + np.exp(-z))
        result = compare_on_spans(table, test, prob)
        result["probe"] = result["probe"].model_copy(update={"ece": None})  # uncalibrated
        real = test[~table.invented[test]]
        if 0 < table.y[real].sum() < len(real):
            z_real = span_logits(probe, table, real, layers, position)
            result["real_only"] = compare_on_spans(table, real, 1.0 / (1.0 + np.exp(-z_real)))
        result["trained_on"] = sorted(set(values[values != held].tolist()))
        out[held] = result
    return out


__all__ = ["FabricationProbeTrainer", "ProbeSelector", "TrainConfig", "cross_topic",
           "grouped_folds", "grouped_holdout", "span_logits"]
