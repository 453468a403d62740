"""Detection quality of the shipped probe against its baselines, read from its evaluation.

The training pipeline (``lie-detector train-default``, ``probes/pipeline.py``) writes
``detector/default_probe/<name>/metrics.json``; this module only reads it (nothing is
recomputed), so the table always shows the evaluation that shipped with the probe. Format, as
``probes/report.py`` writes it: ``heldout.{all,real_only}.<scorer>`` and
``cross_topic.<domain>.<scorer>`` hold ``auroc``, ``auprc``, ``recall_at_fpr`` (at ``fpr``) and
``ece`` per scorer (``probe`` and the baselines ``neg_min_logprob``, ``neg_mean_logprob``,
``mean_entropy``); ``heldout.all.random_direction`` holds ``auroc_mean``/``auroc_std``;
``targets`` says whether the probe met its target.

    .venv/bin/python -m benchmarks.detection     # print the table
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROBE = "smollm2-135m-fabrication"
METRICS = ROOT / "detector" / "default_probe" / DEFAULT_PROBE / "metrics.json"

SCORERS = {
    "probe": "shipped probe (linear, residual stream)",
    "neg_min_logprob": "baseline: lowest token log-probability",
    "neg_mean_logprob": "baseline: mean token log-probability",
    "mean_entropy": "baseline: mean predictive entropy",
}


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def summarise(path: Path = METRICS) -> dict[str, Any]:
    """The figures the table shows, or ``{"available": False, "reason": ...}``."""
    if not path.is_file():
        return {"available": False, "source": _rel(path),
                "reason": f"{_rel(path)} is missing (the probe's evaluation has not been run)"}
    try:
        m = json.loads(path.read_text())
        heldout = m["heldout"]
        all_ = heldout["all"]
    except (ValueError, KeyError, TypeError) as exc:
        return {"available": False, "source": _rel(path),
                "reason": f"{_rel(path)} has no held-out evaluation ({exc!r})"}
    real = heldout.get("real_only", {})
    cross = m.get("cross_topic") or {}
    rows = []
    scorers = dict(SCORERS)
    probe_only = heldout.get("probe_only") or {}
    if m.get("verdict") and "probe" in probe_only:
        # The served claim score is the verdict (detector.verdict); the probe alone beside it.
        scorers = {"probe": "shipped verdict (probe + token probability, by rank)",
                   "probe_only": "the probe alone (linear, residual stream)",
                   **{k: v for k, v in SCORERS.items() if k != "probe"}}
        all_ = {**all_, "probe_only": probe_only["probe"]}
    for key, label in scorers.items():
        if key not in all_:
            continue
        a = all_[key]
        # Cross-topic figures are the probe's alone (cross_topic refits the probe only).
        cross_key = {"probe_only": "probe", "probe": None}.get(key, key) \
            if "probe_only" in scorers else key
        cross_aurocs = [_num(d.get(cross_key, {}).get("auroc")) for d in cross.values()
                        if isinstance(d, dict)] if cross_key else []
        cross_aurocs = [x for x in cross_aurocs if x is not None]
        rows.append({
            "scorer": key, "label": label,
            "auroc": _num(a.get("auroc")), "auprc": _num(a.get("auprc")),
            "recall_at_fpr": _num(a.get("recall_at_fpr")), "fpr": _num(a.get("fpr")),
            "ece": _num(a.get("ece")),
            "auroc_real_only": _num(real.get(key, {}).get("auroc")),
            "auroc_cross_topic_mean": statistics.fmean(cross_aurocs) if cross_aurocs else None,
            "cross_topic_domains": len(cross_aurocs),
        })
    rnd = all_.get("random_direction") or {}
    split = heldout.get("split") or {}
    targets = m.get("targets") or {}
    return {
        "available": True, "source": _rel(path), "name": m.get("name"),
        "model": (m.get("model") or {}).get("name"),
        "n_spans": all_.get("probe", {}).get("n"),
        "n_fabrication": all_.get("probe", {}).get("n_fabrication"),
        "n_retrieval": all_.get("probe", {}).get("n_retrieval"),
        "split": split, "rows": rows,
        "random_direction": {"auroc_mean": _num(rnd.get("auroc_mean")),
                             "auroc_std": _num(rnd.get("auroc_std")),
                             "n": rnd.get("n_directions")},
        "selection": {k: (m.get("selection") or {}).get("best", {}).get(k)
                      for k in ("layers", "position", "C")},
        "threshold": m.get("threshold"),
        "targets": {k: targets.get(k) for k in ("auroc_target", "margin_target", "probe_auroc",
                                                 "best_baseline", "best_baseline_auroc",
                                                 "margin", "met")},
        "command": m.get("command"),
    }


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    if not summary.get("available"):
        return f"Detection quality: not available ({summary.get('reason')}).\n"
    fpr = next((r["fpr"] for r in summary["rows"] if r["fpr"] is not None), 0.1)
    sel = summary["selection"]
    t = summary["targets"]
    lines = [
        f"Detection quality of the shipped probe `{summary['name']}` on {summary['model']}: "
        f"held-out spans (question groups never seen in training; {summary['n_spans']} spans, "
        f"{summary['n_fabrication']} fabrication / {summary['n_retrieval']} retrieval), "
        f"read from `{summary['source']}` (written by `{summary.get('command') or 'training'}`). "
        f"Probe: layers {sel.get('layers')}, score position `{sel.get('position')}`, "
        f"C={sel.get('C')}.",
        "",
        f"| scorer | AUROC | AUPRC | recall @ {100 * fpr:g}% FPR | ECE | AUROC, real entities "
        "only | AUROC, unseen topic (mean) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary["rows"]:
        name = f"**{r['label']}**" if r["scorer"] == "probe" else r["label"]
        lines.append(f"| {name} | {_f(r['auroc'])} | {_f(r['auprc'])} | "
                     f"{_f(r['recall_at_fpr'])} | {_f(r['ece'])} | {_f(r['auroc_real_only'])} | "
                     f"{_f(r['auroc_cross_topic_mean'])} |")
    rnd = summary["random_direction"]
    if rnd.get("auroc_mean") is not None:
        lines.append(f"| random directions ({rnd.get('n')}), mean ± sd | "
                     f"{rnd['auroc_mean']:.3f} ± {rnd['auroc_std']:.3f} | | | | | |")
    if t.get("probe_auroc") is not None:
        lines += ["", f"Target: AUROC >= {t.get('auroc_target')} and >= {t.get('margin_target')} "
                  f"above the best baseline (`{t.get('best_baseline')}`, "
                  f"{_f(t.get('best_baseline_auroc'))}): margin {_f(t.get('margin'))}, "
                  f"{'met' if t.get('met') else 'NOT met'}. ECE only for the calibrated probe; "
                  "'unseen topic' trains on the other domains and tests on this one."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(summarise()))
