"""Measure training protocols against each other on one capture, offline.

``python -m probes.protocols --capture DIR --out FILE.json`` trains, on the same entity
split as ``lie-detector train`` (seed 0, 25% of entities held out), one probe per protocol:

* ``old``: the former protocol: classes balanced over all spans, layer/row/C chosen by
  entity-grouped 5-fold CV (which rewards template features);
* ``new``: topic-balanced weights and leave-one-topic-out selection (the default);
* ``hybrid``: ``new`` on the rows plus the scored token's log-probability and entropy
  (``TrainConfig.token_features``; measured here only, shipping it is a separate call).

For each it reports the in-distribution held-out AUROC (all and real entities), the
cross-domain table (train on two domains, test on the third: pooled AUROC and the mean
within-topic AUROC, against min log-prob) and leave-one-topic-out over every topic (train
on all other topics with the chosen configuration, test on one). Candidates (layers, rows,
C) are the same for every protocol, except with ``--selected METRICS.json`` (the
``metrics.json`` of a ``new``-protocol training run, e.g. the shipped probe's): then ``new``
refits exactly that run's choice (same folds, same probe) and ``hybrid`` keeps its layers
and row and chooses only C, which saves two full selections.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from probes.evaluate import compare_on_spans
from probes.hybrid import with_token_features
from probes.report import to_jsonable
from probes.spans import SpanTable, load_span_table
from probes.store import CaptureStore
from probes.train import FabricationProbeTrainer, TrainConfig, cross_topic, grouped_holdout

logger = logging.getLogger(__name__)

PROTOCOLS: dict[str, dict[str, Any]] = {
    "old": {"cv_scheme": "entities", "topic_balance": False},
    "new": {},
    "hybrid": {"token_features": ["logprob", "entropy"]},
}


def _cross(table: SpanTable, trainer: FabricationProbeTrainer, cfg: TrainConfig, key: str
           ) -> dict[str, Any]:
    res = cross_topic(with_token_features(table, trainer.token_features_),
                      np.arange(table.n_spans), layers=trainer.layers_,
                      position=trainer.position_, C=trainer.C_, max_iter=cfg.max_iter, key=key,
                      token_weighting=cfg.token_weighting, topic_balance=cfg.topic_balance,
                      min_class_spans=cfg.min_class_spans, min_eval_spans=cfg.min_eval_spans)
    out = {}
    for held, r in res.items():
        out[held] = {
            "n": r["probe"].n, "n_fabrication": r["probe"].n_fabrication,
            "probe": r["probe"].auroc, "neg_min_logprob": r["neg_min_logprob"].auroc,
            "neg_mean_logprob": r["neg_mean_logprob"].auroc,
            "mean_entropy": r["mean_entropy"].auroc,
            "within_topic": {k: v for k, v in r["within_topic"].items() if k != "topics"},
            "within_topics": r["within_topic"]["topics"],
        }
    return out


def run_protocol(table: SpanTable, train: np.ndarray, test: np.ndarray, name: str,
                 base: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Select, fit and evaluate one protocol; every number the comparison reports."""
    cfg = TrainConfig(**{**base, **PROTOCOLS[name]})
    logger.info("protocol %s: %s", name, cfg.model_dump(include={
        "layers", "score_positions", "Cs", "cv_scheme", "topic_balance", "token_features"}))
    t0 = time.monotonic()
    trainer = FabricationProbeTrainer(config=cfg, progress=progress).fit(table, train)
    seconds = time.monotonic() - t0
    prob = trainer.span_proba(table, test)
    real = ~table.invented[test]
    held = compare_on_spans(table, test, prob)
    held_real = compare_on_spans(table, test[real], prob[real])
    logger.info("%s: layers %s %s C=%g, held-out AUROC %.3f (min log-prob %.3f)", name,
                trainer.layers_, trainer.position_, trainer.C_, held["probe"].auroc,
                held["neg_min_logprob"].auroc)
    return {
        "config": cfg.model_dump(),
        "selected": {"layers": trainer.layers_, "position": trainer.position_, "C": trainer.C_,
                     "cv_scheme": trainer.selector_.cv_scheme_,
                     "cv_auroc": trainer.selector_.best_["auroc_mean"]},
        "selection_seconds": seconds,
        "threshold": trainer.threshold_,
        "heldout": {k: held[k].auroc for k in ("probe", "neg_min_logprob", "neg_mean_logprob",
                                                "mean_entropy")},
        "heldout_real": {k: held_real[k].auroc for k in ("probe", "neg_min_logprob")},
        "heldout_fpr_at_threshold": float((prob[table.y[test] == 0] >= trainer.threshold_).mean()),
        "heldout_recall_at_threshold": float(
            (prob[table.y[test] == 1] >= trainer.threshold_).mean()),
        "cross_domain": _cross(table, trainer, cfg, "domains"),
        "leave_one_topic_out": _cross(table, trainer, cfg, "balance_topics"),
    }


def _f(x: float | None) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _num(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def markdown(results: dict[str, Any]) -> str:
    """The comparison as markdown tables (what docs/training.md quotes; NaN or None: –)."""
    lines = ["| protocol | chosen | held-out AUROC (min log-prob) | real only (min log-prob) |",
             "|---|---|---|---|"]
    for name, r in results["protocols"].items():
        s, h, hr = r["selected"], r["heldout"], r["heldout_real"]
        lines.append(f"| {name} | layers {s['layers']} {s['position']} C={s['C']:g} | "
                     f"{h['probe']:.3f} ({h['neg_min_logprob']:.3f}) | "
                     f"{hr['probe']:.3f} ({hr['neg_min_logprob']:.3f}) |")
    for table, title in (("cross_domain", "held-out domain"),
                         ("leave_one_topic_out", "held-out topic")):
        names = list(results["protocols"])
        lines += ["", f"| {title} | spans | " + " | ".join(names) + " | min log-prob | "
                  + " | ".join(f"{n} within-topic" for n in names) + " | min log-prob within |",
                  "|---" * (3 + 2 * len(names) + 1) + "|"]
        first = results["protocols"][names[0]][table]
        for held in first:
            rows = [results["protocols"][n][table].get(held) for n in names]
            if any(r is None for r in rows):
                continue
            within = [r["within_topic"].get("probe") for r in rows]
            lines.append(
                f"| {held} | {rows[0]['n']} | " + " | ".join(_f(r["probe"]) for r in rows)
                + f" | {_f(rows[0]['neg_min_logprob'])} | "
                + " | ".join(_f(w) for w in within)
                + f" | {_f(rows[0]['within_topic'].get('neg_min_logprob'))} |")
        lines.append("")
        for n in names:
            vals = results["protocols"][n][table]
            wins = sum(v["probe"] > v["neg_min_logprob"] for v in vals.values())
            mean = np.mean([v["probe"] - v["neg_min_logprob"] for v in vals.values()])
            within = [_num(v["within_topic"].get("probe"))
                      - _num(v["within_topic"].get("neg_min_logprob")) for v in vals.values()]
            within = [w for w in within if np.isfinite(w)]
            lines.append(f"- {n}: beats min log-prob on {wins} of {len(vals)} ({title}); mean "
                         f"AUROC difference {mean:+.3f}, within topics "
                         f"{np.mean(within) if within else float('nan'):+.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", required=True, help="a capture directory")
    parser.add_argument("--out", required=True, help="JSON file of the results")
    parser.add_argument("--protocols", default="old,new,hybrid")
    parser.add_argument("--candidate-layers", help="e.g. 8,12,16,20 (default: all captured)")
    parser.add_argument("--positions", default="producer,own")
    parser.add_argument("--Cs", default="0.001,0.01,0.1,1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--selected", metavar="METRICS.json",
                        help="a new-protocol run's metrics.json: new refits its choice, hybrid "
                        "keeps its layers and row")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base: dict[str, Any] = {
        "layers": [int(k) for k in args.candidate_layers.split(",")]
        if args.candidate_layers else None,
        "score_positions": [p for p in args.positions.split(",") if p],
        "Cs": [float(c) for c in args.Cs.split(",") if c], "seed": args.seed,
        "cross_topic": False,
    }
    table = load_span_table(CaptureStore.open(args.capture))
    train, test = grouped_holdout(table.y, table.groups, 0.25, args.seed)
    results: dict[str, Any] = {"capture": str(Path(args.capture).resolve()),
                               "command": "python -m probes.protocols " + " ".join(
                                   argv if argv is not None else __import__("sys").argv[1:]),
                               "n_train": len(train), "n_test": len(test), "protocols": {}}
    out = Path(args.out)
    chosen = json.loads(Path(args.selected).read_text())["selection"]["best"] \
        if args.selected else None
    for name in [p for p in args.protocols.split(",") if p]:
        own = dict(base)
        if chosen is not None and name in ("new", "hybrid"):
            # the chosen layers (a concatenation is re-evaluated as one, as selected)
            own.update(layers=chosen["layers"], score_positions=[chosen["position"]],
                       concat_top=len(chosen["layers"]) if len(chosen["layers"]) > 1 else 0)
            if name == "new":
                own.update(Cs=[chosen["C"]], screen_C=chosen["C"])
        results["protocols"][name] = run_protocol(table, train, test, name, own,
                                                  progress=not args.no_progress)
        out.write_text(json.dumps(to_jsonable(results), indent=2))  # partial results too
    text = markdown(results)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
