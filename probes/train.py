"""Train a fabrication probe that cannot learn the topic; choose layer, row and C by
leave-one-topic-out; calibrate.

A topic (a question template: "capital of a country", "discoverer of an element") has its
own base rate of fabrication (the model knows continents, not discoverers), so a probe
trained and selected naively can score "this is a discoverer question" instead of "the
model is making this up". Two things stop that:

* **topic-balanced weights** (:func:`topic_balanced_weights`): within every topic the
  fabrication and retrieval spans carry equal mass, and every topic the same mass, so a
  feature that only knows the topic is worth nothing to the fit. Invented-entity questions
  count in the topic of the real template they imitate (:func:`balance_topics`): they are
  that template's fabrications. A topic with fewer than ``min_class_spans`` spans of one
  class gets proportionally less mass (a handful of spans never dominate); a topic with
  none of one class gets none;
* **leave-one-topic-out selection** (``cv_scheme="topics"``): layer, score position and C
  are chosen by the mean *within-topic* AUROC on topics the fold's probe never saw, so
  neither template features nor between-topic offsets of the score can win.

Protocol (the test split is grouped by entity, so no entity is on both sides):

1. the caller holds out test entities (:func:`grouped_holdout`);
2. on the training spans, :class:`ProbeSelector` cross-validates every candidate layer x
   score position (screened at one C, then the C grid on the best few, then the best
   layers concatenated), with token-level targets on claim tokens only (each token of a
   claim span carries its label; tokens outside claims are masked: the sidecar judges only
   claim spans), topic-balanced weights and span-level scoring
   (:func:`detector.claims.aggregate_segments`, as the sidecar aggregates). Folds leave
   one topic out (``cv_scheme``: ``topics``; ``domains`` leaves a domain out; ``entities``
   is the former stratified entity-grouped k-fold);
3. :class:`FabricationProbeTrainer` fits that configuration on all training tokens,
   calibrates span scores on the out-of-fold span logits of step 2 (Platt by default:
   each span's logit comes from a probe that never saw its topic), and picks the threshold
   that flags at most ``target_fpr`` of the out-of-fold retrieval spans.
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
from detector.verdict import VerdictModel
from probes.linear import LinearProbe, threshold_for_fpr
from probes.hybrid import with_token_features
from probes.drift_fit import fit_table_drift, with_drift
from probes.verdict_fit import choose_probe_weight, fit_verdict
from probes.spans import SCORE_POSITIONS, ScorePosition, SpanTable, neg_min_logprob

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
    # Selection folds: "topics" leaves one (balance) topic out, "domains" one domain,
    # "entities" is stratified entity-grouped k-fold (cv_folds; rewards template features).
    cv_scheme: Literal["topics", "domains", "entities"] = "topics"
    # Equal fabrication and retrieval mass within every topic, equal mass per topic.
    topic_balance: bool = True
    # A topic with fewer spans than this of its smaller class gets that fraction of the mass.
    min_class_spans: int = Field(20, ge=1)
    # A held-out topic counts in the selection score with at least this many of each class.
    min_eval_spans: int = Field(10, ge=1)
    # Hybrid probe: token features appended after the rows (probes.hybrid); [] = rows only.
    token_features: list[Literal["logprob", "entropy"]] = Field(default_factory=list)
    # Claim verdict (detector.verdict): "rank" fuses the probe with the claim's -min
    # log-probability by rank, calibrated out of fold; "none" serves the probe alone.
    verdict: Literal["rank", "none"] = "rank"
    # Weight of the probe's rank in the fusion (the log-probability's is 1 - this); None:
    # chosen among probes.verdict_fit.PROBE_WEIGHTS by out-of-fold within-domain AUROC.
    verdict_probe_weight: float | None = Field(None, ge=0.0, le=1.0)


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


def balance_topics(table: SpanTable, spans: np.ndarray | None = None) -> np.ndarray:
    """The topic each span is balanced and held out in: its own, except that an
    invented-entity template counts in the real topic it imitates
    (``probes.datasets.invented.TEMPLATES``): "the capital of <invented>" answers are the
    fabrications of ``country_capital``, next to its real questions. Per span of ``spans``
    (all spans by default)."""
    from probes.datasets.invented import TEMPLATES

    topics = table.topics if spans is None else table.topics[np.asarray(spans, dtype=np.int64)]
    return np.asarray([TEMPLATES[t][1] if t in TEMPLATES else t for t in topics.tolist()],
                      dtype=object)


def topic_balanced_weights(y: np.ndarray, topics: np.ndarray, *, min_class_spans: int = 20
                           ) -> np.ndarray:
    """Per-span weights: within each topic the fabrication and retrieval spans carry equal
    mass, and every topic the same mass, scaled by ``min(1, k / min_class_spans)`` where k
    is the topic's smaller class count (so a topic with 3 retrievals cannot make each of
    them weigh a sixth of the topic). A topic with one class only gets weight 0: it can
    teach nothing but its base rate. Mean weight 1 over the spans."""
    y = np.asarray(y).astype(bool)
    topics = np.asarray(topics)
    w = np.zeros(y.shape[0], dtype=np.float64)
    for t in np.unique(topics):
        m = topics == t
        n_fab, n_ret = int((m & y).sum()), int((m & ~y).sum())
        k = min(n_fab, n_ret)
        if k == 0:
            continue
        mass = min(1.0, k / float(min_class_spans))
        w[m & y] = mass / n_fab
        w[m & ~y] = mass / n_ret
    if not w.sum():
        raise ValueError("no topic has both fabrication and retrieval spans: topic-balanced "
                         "training has nothing to learn from (set topic_balance=False)")
    return w * (w.size / w.sum())


def training_weights(table: SpanTable, spans: np.ndarray, *, weighting: str = "span",
                     topic_balance: bool = False, min_class_spans: int = 20) -> np.ndarray | None:
    """Per-token weights of a fit on ``spans``' tokens (None: unweighted).

    ``weighting="span"``: every span's tokens share its weight (1/len each); ``"token"``:
    every token weighs its span's weight. With ``topic_balance`` the span weights are
    :func:`topic_balanced_weights` over :func:`balance_topics`, else 1 (and the fit
    balances the classes globally). Mean 1 over the tokens."""
    spans = np.asarray(spans, dtype=np.int64)
    counts = table.token_count[spans]
    if not topic_balance:
        return table.token_weights(spans) if weighting == "span" else None
    y = table.y[spans]
    try:
        span_w = topic_balanced_weights(y, balance_topics(table, spans),
                                        min_class_spans=min_class_spans)
    except ValueError as exc:  # e.g. a few spans per topic: balance the classes globally
        logger.warning("%s; balancing the classes over all topics instead", exc)
        span_w = topic_balanced_weights(y, np.zeros(len(spans)), min_class_spans=1)
    per_token = span_w / counts if weighting == "span" else span_w
    w = np.repeat(per_token, counts)
    return w * (w.size / w.sum())


def _fit_tokens(table: SpanTable, spans: np.ndarray, layers: Sequence[int],
                position: ScorePosition, C: float, max_iter: int,
                calibration: str = "none", x: np.ndarray | None = None,
                weighting: str = "span", topic_balance: bool = False,
                min_class_spans: int = 20) -> LinearProbe:
    """Token-level fit on claim tokens: every token of a span carries the span's label.

    With ``topic_balance`` the weights already balance the classes (within every topic),
    so the logistic regression's own global class balancing is switched off."""
    x = table.features(spans, layers, position) if x is None else x
    probe = LinearProbe(C=C, max_iter=max_iter, calibration=calibration,  # type: ignore[arg-type]
                        class_weight=None if topic_balance else "balanced")
    weights = training_weights(table, spans, weighting=weighting, topic_balance=topic_balance,
                               min_class_spans=min_class_spans)
    return probe.fit(x, table.token_labels(spans), sample_weight=weights)


def span_logits(probe: LinearProbe, table: SpanTable, spans: np.ndarray,
                layers: Sequence[int], position: ScorePosition) -> np.ndarray:
    """Max over each span's tokens of the probe's logit."""
    return table.span_max(spans, probe.decision_function(table.features(spans, layers, position)))


def heldout_folds(table: SpanTable, spans: np.ndarray, scheme: str, *, n_folds: int = 5,
                  seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cross-validation folds (train, validation) over ``spans``.

    ``topics``: one fold per :func:`balance_topics` topic, validated on that topic alone;
    ``domains``: one per domain; ``entities``: :func:`grouped_folds`. A fold whose training
    side lacks a class is dropped (nothing to fit)."""
    spans = np.asarray(spans, dtype=np.int64)
    if scheme == "entities":
        return grouped_folds(table, spans, n_folds, seed)
    if scheme not in ("topics", "domains"):
        raise ValueError(f"unknown cv scheme {scheme!r} (topics|domains|entities)")
    keys = balance_topics(table, spans) if scheme == "topics" else table.domains[spans]
    folds = []
    for key in sorted(set(keys.tolist())):
        train, val = spans[keys != key], spans[keys == key]
        if 0 < table.y[train].sum() < len(train):
            folds.append((train, val))
    if len(folds) < 2:
        raise ValueError(f"need at least 2 {scheme} with both classes in training for "
                         f"leave-one-out selection, have {len(folds)}")
    return folds


def within_topic_auroc(table: SpanTable, spans: np.ndarray, scores: np.ndarray, *,
                       min_spans: int = 10) -> dict[str, float]:
    """AUROC of ``scores`` within each :func:`balance_topics` topic of ``spans`` that has at
    least ``min_spans`` of each class: what a score does for a question of one kind, free
    of any offset between kinds."""
    spans = np.asarray(spans, dtype=np.int64)
    keys = balance_topics(table, spans)
    y = table.y[spans]
    out = {}
    for key in sorted(set(keys.tolist())):
        m = keys == key
        if min(int(y[m].sum()), int((1 - y[m]).sum())) >= min_spans:
            out[key] = _safe_auroc(y[m], np.asarray(scores)[m])
    return out


def _safe_auroc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")


class ProbeSelector(BaseEstimator):
    """CV over layers x score positions x C; learned: ``folds_``, ``cv_results_``, ``best_``.

    ``cv_scheme="topics"`` (leave one topic out): a configuration's score is the mean over
    held-out topics of the within-topic AUROC (:func:`within_topic_auroc`, topics with at
    least ``min_eval_spans`` of each class); ``"domains"``: the mean within-topic AUROC per
    held-out domain; ``"entities"``: the fold's pooled AUROC (the former protocol)."""

    def __init__(self, *, layers: Sequence[int] | None = None,
                 score_positions: Sequence[ScorePosition] = SCORE_POSITIONS,
                 Cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0), screen_C: float | None = None,
                 refine_top: int = 3, concat_top: int = 2, token_weighting: str = "span",
                 cv_folds: int = 5, max_iter: int = 2000, seed: int = 0,
                 cv_scheme: str = "topics", topic_balance: bool = True,
                 min_class_spans: int = 20, min_eval_spans: int = 10,
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
        self.cv_scheme = cv_scheme
        self.topic_balance = topic_balance
        self.min_class_spans = min_class_spans
        self.min_eval_spans = min_eval_spans
        self.progress = progress

    def fit(self, table: SpanTable, spans: np.ndarray) -> ProbeSelector:
        spans = np.asarray(spans, dtype=np.int64)
        layers = list(self.layers) if self.layers else list(table.layers)
        unknown = sorted(set(layers) - set(table.layers))
        if unknown:
            raise ValueError(f"candidate layers {unknown} were not captured ({table.layers})")
        self.folds_, self.cv_scheme_ = self._folds(table, spans)
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
                ranked = sorted(self.cv_results_, key=lambda r: -self._score(r))
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
        self.selection_score_ = self._selection_score()
        best = max(self.cv_results_, key=lambda r: (self._score(r), -len(r["layers"])))
        # Prefer a single layer unless concatenation is clearly better.
        best_single = self._best_single()
        key = self.selection_score_
        if len(best["layers"]) > 1 and best[key] - best_single[key] < 0.005:
            best = best_single
        self.best_ = dict(best)
        logger.info("CV (%s, %d folds, %.0f s): best %s position, layers %s, C=%g: "
                    "AUROC %.3f +- %.3f (pooled out of fold %.3f; ranked by %s)",
                    self.cv_scheme_, len(self.folds_), time.monotonic() - t0, best["position"],
                    best["layers"], best["C"], best["auroc_mean"], best["auroc_std"],
                    best["auroc_oof"], key)
        return self

    def _selection_score(self) -> str:
        """Which CV figure ranks configurations: the mean fold score, or, where no fold
        could be scored (every held-out topic lacks a class), the pooled out-of-fold AUROC.
        Never an undefined one: with neither defined the data is too small to choose."""
        key = self._score_key()
        if any(np.isfinite(r[key]) for r in self.cv_results_):
            if key != "auroc_mean":
                logger.warning("no held-out %s has both classes: configurations are ranked "
                               "by pooled out-of-fold AUROC instead", self.cv_scheme_)
            return key
        raise ValueError(
            f"too little data to choose a probe: none of the {len(self.folds_)} "
            f"{self.cv_scheme_} folds scores a configuration (each held-out side has one "
            "class); capture more questions per topic (--limit-per-topic)")

    def _score_key(self) -> str:
        """The mean fold score while some configuration has one, else pooled OOF AUROC."""
        if any(np.isfinite(r["auroc_mean"]) for r in self.cv_results_):
            return "auroc_mean"
        return "auroc_oof"

    def _score(self, r: dict[str, Any]) -> float:
        return float(np.nan_to_num(r[self._score_key()], nan=-1.0))

    def _best_single(self) -> dict[str, Any]:
        singles = [r for r in self.cv_results_ if len(r["layers"]) == 1]
        return max(singles, key=self._score)

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
                                    x=x_all[tr_mask], weighting=self.token_weighting,
                                    topic_balance=self.topic_balance,
                                    min_class_spans=self.min_class_spans)
                val_idx = np.array([index_of[int(s)] for s in val])
                va_mask = np.isin(token_owner, val_idx)
                z = table.span_max(val, probe.decision_function(x_all[va_mask]))
                oof[val_idx] = z
                fold_aurocs.append(self._fold_score(table, val, z))
                bar.update()
            self._oof[(layers, pos, C)] = oof
            scored = [a for a in fold_aurocs if np.isfinite(a)]
            self.cv_results_.append({
                "layers": list(layers), "position": pos, "C": float(C),
                "auroc_mean": float(np.mean(scored)) if scored else float("nan"),
                "auroc_std": float(np.std(scored)) if scored else float("nan"),
                "auroc_oof": _safe_auroc(table.y[spans], oof),
                "fold_aurocs": [float(a) for a in fold_aurocs],
                "within_topic_oof": within_topic_auroc(table, spans, oof,
                                                       min_spans=self.min_eval_spans),
            })

    def _folds(self, table: SpanTable, spans: np.ndarray
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
        """The folds of ``cv_scheme``, or entity-grouped folds (with a warning) when leaving
        a topic out cannot score every span: one topic only (users' data without topics),
        or a topic whose complement lacks a class."""
        scheme = self.cv_scheme
        try:
            folds = heldout_folds(table, spans, scheme, n_folds=self.cv_folds, seed=self.seed)
            validated = np.concatenate([val for _, val in folds])
            missing = len(spans) - len(np.unique(validated))
            if missing:
                raise ValueError(f"{missing} training spans belong to {scheme} whose "
                                 f"complement lacks a class")
        except ValueError as exc:
            if scheme == "entities":
                raise
            logger.warning("%s: selecting by entity-grouped %d-fold CV instead (it rewards "
                           "features of the topic)", exc, self.cv_folds)
            scheme = "entities"
            folds = grouped_folds(table, spans, self.cv_folds, self.seed)
        return folds, scheme

    def _fold_score(self, table: SpanTable, val: np.ndarray, z: np.ndarray) -> float:
        """A fold's score: pooled AUROC for entity folds, else the mean within-topic AUROC
        of the held-out topic(s) (NaN when none has enough of both classes)."""
        if self.cv_scheme_ == "entities":
            return _safe_auroc(table.y[val], z)
        per_topic = [a for a in within_topic_auroc(table, val, z,
                                                   min_spans=self.min_eval_spans).values()
                     if np.isfinite(a)]
        return float(np.mean(per_topic)) if per_topic else float("nan")

    def _layer_ranking(self, pos: ScorePosition) -> list[int]:
        per_layer: dict[int, float] = {}
        for r in self.cv_results_:
            if r["position"] == pos and len(r["layers"]) == 1:
                k = r["layers"][0]
                per_layer[k] = max(per_layer.get(k, -1.0), self._score(r))
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
        self.token_features_ = list(cfg.token_features)
        table = with_token_features(table, self.token_features_)
        self.selector_ = ProbeSelector(
            layers=cfg.layers, score_positions=cfg.score_positions, Cs=cfg.Cs,
            screen_C=cfg.screen_C, refine_top=cfg.refine_top, concat_top=cfg.concat_top,
            token_weighting=cfg.token_weighting, cv_folds=cfg.cv_folds, max_iter=cfg.max_iter,
            seed=cfg.seed, cv_scheme=cfg.cv_scheme, topic_balance=cfg.topic_balance,
            min_class_spans=cfg.min_class_spans, min_eval_spans=cfg.min_eval_spans,
            progress=self.progress,
        ).fit(table, spans)
        best = self.selector_.best_
        self.layers_ = [int(k) for k in best["layers"]]
        self.position_: ScorePosition = best["position"]
        self.C_ = float(best["C"])
        self.probe_ = _fit_tokens(table, spans, self.layers_, self.position_, self.C_,
                                  cfg.max_iter, calibration=cfg.calibration,
                                  weighting=cfg.token_weighting,
                                  topic_balance=cfg.topic_balance,
                                  min_class_spans=cfg.min_class_spans)
        # What the probe's rows look like in training, shipped to report drift when served.
        self.drift_ = fit_table_drift(table, spans, self.layers_, seed=cfg.seed)
        oof = self.selector_.oof_logits(self.layers_, self.position_, self.C_)
        ok = np.isfinite(oof)
        self.probe_.recalibrate(oof[ok], table.y[spans][ok].astype(bool))
        self.oof_prob_ = self.probe_.calibrate(oof)
        negatives = self.oof_prob_[ok & (table.y[spans] == 0)]
        threshold = threshold_for_fpr(negatives, cfg.target_fpr)
        self.threshold_ = float(min(max(threshold, 1e-6), 1.0 - 1e-6))
        self.train_spans_ = spans
        self.verdict_: VerdictModel | None = None
        if cfg.verdict == "rank":
            signals = np.c_[self.oof_prob_, neg_min_logprob(table, spans)]
            w = cfg.verdict_probe_weight
            self.verdict_weights_: dict[str, float] = {}
            if w is None:
                w, self.verdict_weights_ = choose_probe_weight(
                    table.y[spans][ok], signals[ok], table.domains[spans][ok])
                logger.info("verdict: probe weight %g (out-of-fold mean within-domain AUROC "
                            "by weight: %s)", w, self.verdict_weights_)
            self.verdict_ = fit_verdict(table.y[spans][ok], signals[ok], weights=(w, 1.0 - w),
                                        target_fpr=cfg.target_fpr,
                                        groups=table.domains[spans][ok])
        logger.info("probe: layers %s, %s position, C=%g, %s calibration, threshold %.4f "
                    "(<= %.0f%% out-of-fold retrieval spans flagged)", self.layers_,
                    self.position_, self.C_, cfg.calibration, self.threshold_,
                    100 * cfg.target_fpr)
        return self

    def span_proba(self, table: SpanTable, spans: np.ndarray, *, verdict: bool = True
                   ) -> np.ndarray:
        """Calibrated span probability of fabrication: the verdict's, when one was fitted
        (and ``verdict``), else the probe's own (max over the span's tokens)."""
        check_is_fitted(self, "probe_")
        table = with_token_features(table, self.token_features_)
        prob = self.probe_.calibrate(span_logits(self.probe_, table, spans, self.layers_,
                                                 self.position_))
        if verdict and self.verdict_ is not None:
            return self.verdict_.probabilities(np.c_[prob, neg_min_logprob(table, spans)])
        return prob

    @property
    def claim_threshold_(self) -> float:
        """The threshold :meth:`span_proba` is compared with."""
        if self.verdict_ is not None:
            return self.verdict_.threshold_for()
        return self.threshold_

    def to_artifact(self, *, name: str, model: ModelIdentity, training: dict[str, Any]
                    ) -> ProbeArtifact:
        check_is_fitted(self, "probe_")
        art = self.probe_.to_artifact(name=name, model=model, layers=self.layers_,
                                      score_position=self.position_, threshold=self.threshold_,
                                      training=training, token_features=self.token_features_,
                                      verdict=self.verdict_)
        return with_drift(art, getattr(self, "drift_", None))


def cross_topic(table: SpanTable, spans: np.ndarray, *, layers: Sequence[int],
                position: ScorePosition, C: float, max_iter: int = 2000,
                key: Literal["domains", "topics", "balance_topics"] = "domains",
                token_weighting: str = "span",
                topic_balance: bool = False, min_class_spans: int = 20, min_eval_spans: int = 10,
                ) -> dict[str, dict[str, Any]]:
    """Train on every other domain, test on one; the probe's and baselines' span scores.

    Besides the pooled metrics of :func:`probes.evaluate.compare_on_spans`, each result has
    ``within_topic``: the mean over the held-out domain's topics (at least
    ``min_eval_spans`` of each class) of the within-topic AUROC of the probe and of each
    baseline, which no offset between topics can lift. ``key="balance_topics"`` holds out
    one :func:`balance_topics` topic at a time (a real template with its invented twin)."""
    from probes.evaluate import compare_on_spans

    spans = np.asarray(spans, dtype=np.int64)
    values = balance_topics(table, spans) if key == "balance_topics" else getattr(table, key)[spans]
    out: dict[str, dict[str, Any]] = {}
    for held in sorted(set(values.tolist())):
        test, train = spans[values == held], spans[values != held]
        if not (0 < table.y[test].sum() < len(test)) or not (0 < table.y[train].sum() < len(train)):
            logger.info("cross-topic: skipping %s (one class only)", held)
            continue
        probe = _fit_tokens(table, train, layers, position, C, max_iter,
                            weighting=token_weighting, topic_balance=topic_balance,
                            min_class_spans=min_class_spans)
        z = span_logits(probe, table, test, layers, position)
        prob = 1.0 / (1.0 + np.exp(-z))
        result = compare_on_spans(table, test, prob)
        result["within_topic"] = _within_topic_table(table, test, prob, min_eval_spans)
        result["probe"] = result["probe"].model_copy(update={"ece": None})  # uncalibrated
        real = test[~table.invented[test]]
        if 0 < table.y[real].sum() < len(real):
            z_real = span_logits(probe, table, real, layers, position)
            result["real_only"] = compare_on_spans(table, real, 1.0 / (1.0 + np.exp(-z_real)))
        result["trained_on"] = sorted(set(values[values != held].tolist()))
        out[held] = result
    return out


def _within_topic_table(table: SpanTable, spans: np.ndarray, prob: np.ndarray,
                        min_spans: int) -> dict[str, Any]:
    """Mean within-topic AUROC of the probe and of each baseline on ``spans``."""
    from probes.evaluate import baseline_scores

    scores = {"probe": prob, **baseline_scores(table, spans)}
    out: dict[str, Any] = {}
    for name, s in scores.items():
        ok = np.isfinite(s)
        per = within_topic_auroc(table, spans[ok], s[ok], min_spans=min_spans)
        vals = [v for v in per.values() if np.isfinite(v)]
        out[name] = float(np.mean(vals)) if vals else float("nan")
    out["topics"] = sorted(within_topic_auroc(table, spans, prob, min_spans=min_spans))
    return out


__all__ = ["FabricationProbeTrainer", "ProbeSelector", "TrainConfig", "balance_topics",
           "cross_topic", "grouped_folds", "grouped_holdout", "heldout_folds", "span_logits",
           "topic_balanced_weights", "training_weights", "within_topic_auroc"]
