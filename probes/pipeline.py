"""End-to-end glue: capture -> train -> evaluate -> artifact + report, and ``train-default``."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.artifact import (
    DEFAULT_PROBE_NAME,
    SHIPPED_PROBES_DIR,
    ProbeArtifact,
    folded_linear,
    load_probe,
)
from detector.settings import cache_dir
from probes import report as rpt
from probes.evaluate import (
    baseline_scores,
    best_baseline,
    bootstrap_auroc_gap,
    compare_on_spans,
    random_direction_scores,
)
from probes.capture import NO_CLAIM_REASON
from probes.hybrid import with_token_features
from probes.spans import SpanTable, load_span_table, neg_min_logprob
from probes.store import CaptureStore
from probes.train import FabricationProbeTrainer, TrainConfig, cross_topic, grouped_holdout

logger = logging.getLogger(__name__)

# Where train-default writes: the shipped probe, package data of detector (detector/artifact.py).
DEFAULT_PROBE_DIR = SHIPPED_PROBES_DIR / DEFAULT_PROBE_NAME
AUROC_TARGET = 0.85
MARGIN_TARGET = 0.05


def default_work_dir(name: str = DEFAULT_PROBE_NAME) -> Path:
    return cache_dir() / "training" / name


@dataclass
class TrainResult:
    directory: Path
    artifact: ProbeArtifact
    metrics: dict[str, Any]

    def summary(self) -> str:
        t = self.metrics["targets"]
        held = self.metrics["heldout"]
        real = held.get("real_only") or {}
        real_auc = real["probe"].auroc if real else float("nan")
        lines = [
            f"probe {self.artifact.name}: layers {self.artifact.metadata.layers}, "
            f"{self.artifact.metadata.score_position} row, claim threshold "
            f"{self.artifact.metadata.claim_threshold:.4f}"
            + (" (verdict: probe + token probability by rank)"
               if self.artifact.metadata.verdict else ""),
            f"held-out span AUROC {t['probe_auroc']:.3f} (real entities only {real_auc:.3f}); "
            f"best baseline {t['best_baseline']} {t['best_baseline_auroc']:.3f}; "
            f"margin {t['margin']:+.3f}{_ci(t.get('margin_bootstrap'))}; "
            f"target {'met' if t['met'] else 'NOT met'}",
        ]
        if "real_only" in t:
            r = t["real_only"]
            lines.append(f"real entities only: probe {r['probe_auroc']:.3f}, best baseline "
                         f"{r['best_baseline']} {r['best_baseline_auroc']:.3f}, margin "
                         f"{r['margin']:+.3f}{_ci(r.get('margin_bootstrap'))}")
        for name, res in self.metrics.get("cross_topic", {}).items():
            bb = best_baseline(res)
            lines.append(f"cross-topic {name}: probe {res['probe'].auroc:.3f}, best baseline "
                         f"{bb[0]} {bb[1]:.3f}")
        lines.append(f"written to {self.directory}")
        return "\n".join(lines)


def _ci(boot: dict[str, float] | None) -> str:
    if not boot or not np.isfinite(boot.get("ci95_low", np.nan)):
        return ""
    return f" (95% CI {boot['ci95_low']:+.3f}..{boot['ci95_high']:+.3f})"


def write_bundle(artifact: ProbeArtifact, directory: Path,
                 write_extras: Any) -> Path:
    """Artifact + report files in one directory, replaced as a whole.

    ``write_extras(staging_dir)`` writes the report files. The bundle is assembled in a
    sibling staging directory and renamed into place, so the sidecar never sees a probe
    from one run next to a report from another.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        artifact.save(staging)
        staging.chmod(0o755)  # a shared probe directory (mkdtemp made it owner-only)
        write_extras(staging)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            os.rename(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _labels_by_topic(store: CaptureStore) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = defaultdict(Counter)
    for r in store.records():
        if r.status == "incomplete":
            out[r.topic]["incomplete"] += 1
        for s in r.spans:
            out[r.topic][s.label] += 1
            if s.reason.startswith(NO_CLAIM_REASON):
                out[r.topic]["no_claim"] += 1  # counted in "ambiguous" too
    return {k: dict(v) for k, v in sorted(out.items())}


def _subset_results(table: SpanTable, spans: np.ndarray, prob: np.ndarray, key: str
                    ) -> dict[str, Any]:
    values = getattr(table, key)[spans]
    out = {}
    for v in sorted(set(values.tolist())):
        m = values == v
        out[v] = compare_on_spans(table, spans[m], prob[m])
    return out


def train_from_capture(capture_dir: str | Path, out_dir: str | Path, *,
                       config: TrainConfig | None = None, progress: bool = True,
                       command: str | None = None) -> TrainResult:
    """Train, evaluate against baselines, write the artifact and its report to ``out_dir``."""
    cfg = config or TrainConfig()
    t0 = time.monotonic()
    store = CaptureStore.open(capture_dir)
    table = load_span_table(store)
    train, test = grouped_holdout(table.y, table.groups, cfg.test_fraction, cfg.seed)
    shared = set(table.groups[train].tolist()) & set(table.groups[test].tolist())
    if shared:  # cannot happen with a grouped splitter; checked because it is the contract
        raise RuntimeError(f"entities on both sides of the split: {sorted(shared)[:5]}")
    logger.info("split: %d training spans (%d entities), %d test spans (%d entities)",
                len(train), len(set(table.groups[train])), len(test), len(set(table.groups[test])))

    trainer = FabricationProbeTrainer(config=cfg, progress=progress).fit(table, train)
    prob = trainer.span_proba(table, test)
    randoms = random_direction_scores(table, train, test, layers=trainer.layers_,
                                      position=trainer.position_,
                                      n_directions=cfg.n_random_directions, seed=cfg.seed)
    heldout_all = compare_on_spans(table, test, prob, random_scores=randoms,
                                   fpr=cfg.target_fpr)
    real = ~table.invented[test]
    heldout_real = compare_on_spans(table, test[real], prob[real], fpr=cfg.target_fpr) \
        if 0 < table.y[test[real]].sum() < real.sum() else {}
    y_test = table.y[test]
    thr = trainer.claim_threshold_
    threshold = {
        "value": thr, "target_fpr": cfg.target_fpr,
        "test_fpr": float((prob[y_test == 0] >= thr).mean()) if (y_test == 0).any() else None,
        "test_recall": float((prob[y_test == 1] >= thr).mean()) if (y_test == 1).any() else None,
    }
    bb_name, bb_auc = best_baseline(heldout_all)
    probe_auc = heldout_all["probe"].auroc
    targets = {
        "auroc_target": AUROC_TARGET, "margin_target": MARGIN_TARGET,
        "probe_auroc": probe_auc, "best_baseline": bb_name, "best_baseline_auroc": bb_auc,
        "margin": probe_auc - bb_auc,
        "met": bool(probe_auc >= AUROC_TARGET and probe_auc - bb_auc >= MARGIN_TARGET),
    }
    base = baseline_scores(table, test)
    if bb_name in base:
        targets["margin_bootstrap"] = bootstrap_auroc_gap(y_test, prob, base[bb_name],
                                                          table.groups[test], seed=cfg.seed)
    if heldout_real:
        rb_name, rb_auc = best_baseline(heldout_real)
        targets["real_only"] = {"probe_auroc": heldout_real["probe"].auroc,
                                "best_baseline": rb_name, "best_baseline_auroc": rb_auc,
                                "margin": heldout_real["probe"].auroc - rb_auc}
        if rb_name in base:
            targets["real_only"]["margin_bootstrap"] = bootstrap_auroc_gap(
                y_test[real], prob[real], base[rb_name][real], table.groups[test][real],
                seed=cfg.seed)
    cross = {}
    if cfg.cross_topic:
        logger.info("cross-topic evaluation (train on other domains, test on one)")
        cross = cross_topic(with_token_features(table, trainer.token_features_),
                            np.arange(table.n_spans), layers=trainer.layers_,
                            position=trainer.position_, C=trainer.C_, max_iter=cfg.max_iter,
                            token_weighting=cfg.token_weighting,
                            topic_balance=cfg.topic_balance,
                            min_class_spans=cfg.min_class_spans,
                            min_eval_spans=cfg.min_eval_spans)

    manifest = store.manifest
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "model": manifest.model.model_dump(),
        "capture": {
            "directory": str(Path(capture_dir).resolve()),
            "served_dtype": manifest.served_dtype,
            "captured_layers": manifest.layers,
            "source": manifest.source,
            "dataset_hash": manifest.dataset_hash,
            "settings": manifest.settings,
            "labels_by_topic": _labels_by_topic(store),
        },
        "config": cfg.model_dump(),
        "selection": {"best": trainer.selector_.best_,
                      "cv_scheme": trainer.selector_.cv_scheme_,
                      "n_folds": len(trainer.selector_.folds_),
                      "cv_results": trainer.selector_.cv_results_},
        "heldout": {
            "split": {"n_train_spans": int(len(train)), "n_test_spans": int(len(test)),
                      "n_train_groups": len(set(table.groups[train])),
                      "n_test_groups": len(set(table.groups[test])),
                      "shared_groups": len(shared)},
            "all": heldout_all,
            "real_only": heldout_real,
            "by_domain": _subset_results(table, test, prob, "domains"),
            "by_style": _subset_results(table, test, prob, "styles"),
            # The residual-stream probe alone, beside the verdict that fuses it with the
            # claim's token probability (detector.verdict).
            "probe_only": compare_on_spans(table, test,
                                           trainer.span_proba(table, test, verdict=False),
                                           fpr=cfg.target_fpr),
        },
        "verdict": {**trainer.verdict_.model_dump(exclude={"reference"}),
                    "probe_weight_selection": getattr(trainer, "verdict_weights_", {})}
        if trainer.verdict_ is not None else None,
        "threshold": threshold,
        "cross_topic": cross,
        "targets": targets,
        "data_hash": store.data_hash(),
        "seconds": time.monotonic() - t0,
        "command": command or " ".join(sys.argv),
    }
    training_info = {
        "data_hash": metrics["data_hash"],
        "dataset_hash": manifest.dataset_hash,
        "capture_source": manifest.source,
        "served_dtype": manifest.served_dtype,
        "captured_layers": manifest.layers,
        "n_spans": {"train": int(len(train)), "test": int(len(test))},
        "selection": {**{k: trainer.selector_.best_[k] for k in ("layers", "position", "C",
                                                                  "auroc_mean", "auroc_std")},
                      "cv_scheme": trainer.selector_.cv_scheme_},
        "metrics": {
            "heldout_auroc": probe_auc,
            "heldout_auroc_real_only": heldout_real["probe"].auroc if heldout_real else None,
            "heldout_auprc": heldout_all["probe"].auprc,
            "heldout_recall_at_fpr": heldout_all["probe"].recall_at_fpr,
            "heldout_ece": heldout_all["probe"].ece,
            "best_baseline": bb_name, "best_baseline_auroc": bb_auc,
            "cross_topic_auroc": {k: v["probe"].auroc for k, v in cross.items()},
        },
        "config": cfg.model_dump(exclude={"name"}),
    }
    artifact = trainer.to_artifact(name=cfg.name, model=manifest.model,
                                   training=rpt.to_jsonable(training_info))

    curves = {"probe": (y_test, prob)}
    for name, score in base.items():
        curves[name] = (y_test, score)
    curves["random_direction"] = (y_test, randoms[0])
    order = np.argsort(-prob)
    picks = list(order[:8]) + list(order[len(order) // 2 - 3: len(order) // 2 + 3]) + \
        list(order[-8:])
    examples = [{"prob": float(prob[i]), "label": "fabrication" if y_test[i] else "retrieval",
                 "topic": str(table.topics[test[i]]), "question": str(table.questions[test[i]]),
                 "answer": str(table.texts[test[i]])} for i in picks]

    def extras(directory: Path) -> None:
        images = [
            rpt.plot_roc(curves, directory / "roc.png",
                         f"held-out entities: {len(test)} spans").name,
            rpt.plot_calibration(y_test, prob, directory / "calibration.png",
                                 threshold=thr).name,
            rpt.plot_layer_sweep(trainer.selector_.cv_results_, directory / "layers.png",
                                 trainer.selector_.cv_scheme_).name,
        ]
        if heldout_real:
            images.append(rpt.plot_roc(
                {k: (v[0][real], v[1][real]) for k, v in curves.items()},
                directory / "roc_real_only.png",
                f"held-out, real entities only: {int(real.sum())} spans").name)
        if cross:
            images.append(rpt.plot_cross_topic(cross, directory / "cross_topic.png").name)
        rpt.write_metrics(metrics, directory / "metrics.json")
        rpt.write_html(rpt.to_jsonable(metrics), images, directory / "report.html",
                       examples=examples)

    directory = write_bundle(artifact, Path(out_dir), extras)
    result = TrainResult(directory, artifact, metrics)
    logger.info("training done in %.0f s (the CLI prints the summary)", time.monotonic() - t0)
    return result


# ----------------------------------------------------------------------------- eval


def score_spans_with_artifact(artifact: ProbeArtifact, table: SpanTable,
                              spans: np.ndarray) -> np.ndarray:
    """Calibrated span probabilities of a loaded artifact, computed as the sidecar does."""
    meta = artifact.metadata
    missing = sorted(set(meta.layers) - set(table.layers))
    if missing:
        raise ValueError(f"probe {meta.name!r} reads layers {missing} that this capture lacks "
                         f"(captured {table.layers})")
    w, b = folded_linear(artifact)
    table = with_token_features(table, meta.token_features)
    x = table.features(spans, meta.layers, meta.score_position)
    z = x.astype(np.float64) @ w.double().numpy() + b
    z_span = table.span_scores(spans, z, meta.aggregation)
    if meta.calibration == "platt":
        prob = 1.0 / (1.0 + np.exp(-(meta.platt_a * z_span + meta.platt_b)))
    elif meta.calibration == "isotonic":
        assert artifact.isotonic_x is not None and artifact.isotonic_y is not None
        prob = np.interp(z_span, artifact.isotonic_x.double().numpy(),
                         artifact.isotonic_y.double().numpy())
    else:
        prob = 1.0 / (1.0 + np.exp(-z_span))
    if meta.verdict is not None:  # the claim verdict, as the sidecar judges claims
        return meta.verdict.probabilities(np.c_[prob, neg_min_logprob(table, spans)])
    return prob


def evaluate_probe(probe_dir: str | Path, capture_dir: str | Path, out_dir: str | Path, *,
                   fpr: float = 0.10, n_random_directions: int = 20,
                   topics: Sequence[str] | None = None) -> dict[str, Any]:
    """Score a capture with an existing probe; compare with the baselines; write a report."""
    artifact = load_probe(probe_dir)
    store = CaptureStore.open(capture_dir)
    if store.manifest.model.fingerprint != artifact.metadata.model.fingerprint:
        raise ValueError(
            f"probe {artifact.name!r} was trained on model fingerprint "
            f"{artifact.metadata.model.fingerprint}; the capture is of "
            f"{store.manifest.model.fingerprint}")
    table = load_span_table(store)
    spans = np.arange(table.n_spans)
    if topics:
        spans = spans[np.isin(table.topics, list(topics))]
    prob = score_spans_with_artifact(artifact, table, spans)
    randoms = random_direction_scores(table, spans, spans, layers=artifact.metadata.layers,
                                      position=artifact.metadata.score_position,
                                      n_directions=n_random_directions)
    result = compare_on_spans(table, spans, prob, random_scores=randoms, fpr=fpr)
    y = table.y[spans]
    thr = artifact.metadata.claim_threshold
    metrics = {
        "probe": artifact.name, "probe_dir": str(probe_dir), "capture": str(capture_dir),
        "all": result,
        "by_topic": _subset_results(table, spans, prob, "topics"),
        "threshold": {"value": thr,
                      "fpr": float((prob[y == 0] >= thr).mean()) if (y == 0).any() else None,
                      "recall": float((prob[y == 1] >= thr).mean()) if (y == 1).any() else None},
        "note": "random directions are oriented on the evaluated spans themselves (optimistic)",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves = {"probe": (y, prob), **{k: (y, v) for k, v in baseline_scores(table, spans).items()}}
    images = [rpt.plot_roc(curves, out / "roc.png", f"{artifact.name} on {len(spans)} spans").name,
              rpt.plot_calibration(y, prob, out / "calibration.png", threshold=thr).name]
    rpt.write_metrics(metrics, out / "metrics.json")
    rpt.write_eval_html(rpt.to_jsonable(metrics), images, out / "report.html")
    return metrics


__all__ = [
    "AUROC_TARGET",
    "DEFAULT_PROBE_DIR",
    "DEFAULT_PROBE_NAME",
    "MARGIN_TARGET",
    "TrainResult",
    "default_work_dir",
    "evaluate_probe",
    "score_spans_with_artifact",
    "train_from_capture",
    "write_bundle",
]
