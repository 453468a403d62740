"""The training report: PNG plots, ``metrics.json`` and a self-contained ``report.html``."""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

LABELS = {
    "probe": "probe (calibrated)",
    "neg_min_logprob": "min token log-prob",
    "neg_mean_logprob": "mean token log-prob",
    "mean_entropy": "mean token entropy (top-20)",
    "random_direction": "random direction (control)",
}
_CURVE_LABELS = {**LABELS, "random_direction": "one random direction (control)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC curves; ``curves`` maps a scorer name to (labels, scores)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, (y, s) in curves.items():
        keep = np.isfinite(s)
        if not 0 < y[keep].sum() < keep.sum():
            continue
        f, t, _ = roc_curve(y[keep], s[keep])
        auc = roc_auc_score(y[keep], s[keep])
        style = "-" if name == "probe" else ("--" if name != "random_direction" else ":")
        ax.plot(f, t, style, label=f"{_CURVE_LABELS.get(name, name)}: {auc:.3f}",
                lw=2.2 if name == "probe" else 1.4)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.axvline(0.1, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("false positive rate (retrievals flagged)")
    ax.set_ylabel("true positive rate (fabrications flagged)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_calibration(y: np.ndarray, prob: np.ndarray, path: Path, *, threshold: float | None,
                     bins: int = 10) -> Path:
    plt = _plt()
    fig, (ax, hx) = plt.subplots(2, 1, figsize=(5.5, 6), gridspec_kw={"height_ratios": [3, 1]},
                                 sharex=True)
    edges = np.linspace(0, 1, bins + 1)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    xs, ys, ns = [], [], []
    for b in range(bins):
        m = which == b
        if m.any():
            xs.append(prob[m].mean())
            ys.append(y[m].mean())
            ns.append(int(m.sum()))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
    ax.plot(xs, ys, "o-", label="probe")
    for x, yy, n in zip(xs, ys, ns):
        ax.annotate(str(n), (x, yy), fontsize=7, textcoords="offset points", xytext=(3, -9))
    ax.set_ylabel("fraction fabricated")
    ax.set_title("calibration on held-out spans (n per bin annotated)", fontsize=10)
    if threshold is not None:
        ax.axvline(threshold, color="red", lw=0.8, ls="--", label=f"threshold {threshold:.2f}")
    ax.legend(fontsize=8)
    hx.hist([prob[y == 0], prob[y == 1]], bins=edges, label=["retrieval", "fabrication"],
            stacked=True)
    hx.set_xlabel("span probability of fabrication")
    hx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_sweep(cv_results: Sequence[Mapping[str, Any]], path: Path,
                     scheme: str = "entities") -> Path:
    """CV AUROC per layer (best C) for each score position."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for pos in ("producer", "own"):
        best: dict[int, tuple[float, float]] = {}
        for r in cv_results:
            if r["position"] == pos and len(r["layers"]) == 1:
                k = r["layers"][0]
                if k not in best or r["auroc_mean"] > best[k][0]:
                    best[k] = (r["auroc_mean"], r["auroc_std"])
        if best:
            ks = sorted(best)
            ax.errorbar(ks, [best[k][0] for k in ks], yerr=[best[k][1] for k in ks],
                        marker="o", capsize=2, label=f"{pos} row")
    ax.set_xlabel("layer (transformers hidden_states index)")
    ax.set_ylabel(_SCHEME_AXIS.get(scheme, "CV span AUROC (best C)"))
    ax.set_title("which layer and which row score a token", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cross_topic(cross: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    plt = _plt()
    names = list(cross)
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.2
    series = [("probe", "probe"), ("neg_min_logprob", "min log-prob"),
              ("neg_mean_logprob", "mean log-prob"), ("mean_entropy", "entropy")]
    for i, (key, label) in enumerate(series):
        vals = [_auroc(cross[n].get(key)) for n in names]
        ax.bar(np.arange(len(names)) + (i - 1.5) * width, vals, width, label=label)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(names)), [f"{n}\n(held out)" for n in names], fontsize=8)
    ax.set_ylim(0.3, 1.0)
    ax.set_ylabel("span AUROC")
    ax.set_title("cross-topic: trained on the other domains", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _auroc(m: Any) -> float:
    if m is None:
        return float("nan")
    value = m.get("auroc") if isinstance(m, Mapping) else getattr(m, "auroc", None)
    return float("nan") if value is None else float(value)


def _best_baseline_auroc(res: Mapping[str, Any]) -> float:
    values = [_auroc(res.get(b)) for b in ("neg_min_logprob", "neg_mean_logprob", "mean_entropy")]
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else float("nan")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.{digits}f}"
    return html.escape(str(x))


def _signed(x: Any) -> str:
    """A difference with its sign; a dash where it is undefined (NaN, stored as None)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"


def _ci_text(boot: Mapping[str, Any] | None) -> str:
    if not boot or boot.get("ci95_low") is None:
        return ""
    return (f", 95% interval {boot['ci95_low']:+.3f} to {boot['ci95_high']:+.3f} from "
            "resampling held-out entities")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _scorer_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for key in ("probe", "neg_min_logprob", "neg_mean_logprob", "mean_entropy"):
        m = result.get(key)
        if m is None:
            continue
        m = m if isinstance(m, Mapping) else m.model_dump()
        rows.append([LABELS[key], m["auroc"], m["auprc"], m["recall_at_fpr"], m.get("ece"),
                     m["n"], m["n_fabrication"], m["n_retrieval"]])
    rnd = result.get("random_direction")
    if rnd:
        rows.append([LABELS["random_direction"] + f" (mean of {rnd['n_directions']})",
                     rnd["auroc_mean"], None, None, None, None, None, None])
    return rows


def to_jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return to_jsonable(obj.model_dump(mode="json"))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    return obj


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #ccc;
padding:3px 8px;font-size:13px;text-align:right}th{background:#f3f3f3}td:first-child{
text-align:left}img{max-width:48%;margin:4px;border:1px solid #eee}.ok{color:#176d1f}
.bad{color:#a31515}code{background:#f4f4f4;padding:1px 4px}small{color:#666}"""


_SCHEME_AXIS = {
    "entities": "grouped-CV span AUROC (best C)",
    "topics": "leave-one-topic-out AUROC within topics (best C)",
    "domains": "leave-one-domain-out AUROC within topics (best C)",
}
_SCHEME_TEXT = {
    "topics": "leave-one-topic-out CV (mean AUROC within each held-out topic)",
    "domains": "leave-one-domain-out CV (mean AUROC within the held-out domain's topics)",
}


def write_html(metrics: Mapping[str, Any], images: Sequence[str], path: Path,
               examples: Sequence[Mapping[str, Any]] = ()) -> Path:
    m = metrics
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(m['name'])}</title>"
             f"<style>{_CSS}</style><h1>Probe <code>{html.escape(m['name'])}</code></h1>"]
    best = m["selection"]["best"]
    t = m.get("targets", {})
    met = t.get("met")
    parts.append(
        f"<p>Model <b>{html.escape(m['model']['name'])}</b> (fingerprint "
        f"<code>{html.escape(m['model']['fingerprint'])}</code>), rows served as "
        f"{html.escape(str(m['capture']['served_dtype']))}. Chosen by {_scheme_text(m)}"
        f"{' with topic-balanced weights' if m['config'].get('topic_balance') else ''}: "
        f"layers <b>{best['layers']}</b>, "
        f"<b>{best['position']}</b> row, C = {best['C']:g} (CV AUROC {_fmt(best['auroc_mean'])} ± "
        f"{_fmt(best['auroc_std'])}); {m['config']['calibration']} calibration, threshold "
        f"{m['threshold']['value']:.4f} for ≤ {100 * m['config']['target_fpr']:.0f}% "
        f"out-of-fold false positives.</p>")
    if t:
        cls = "ok" if met else "bad"
        parts.append(
            f"<p class='{cls}'>Target (held-out span AUROC ≥ {t['auroc_target']} and ≥ "
            f"{t['margin_target']} above the best baseline): probe {_fmt(t['probe_auroc'])}, best "
            f"baseline {html.escape(t['best_baseline'])} {_fmt(t['best_baseline_auroc'])} "
            f"(margin {_signed(t['margin'])}{_ci_text(t.get('margin_bootstrap'))}) → "
            f"<b>{'met' if met else 'not met'}</b>.</p>")
        r = t.get("real_only")
        if r:
            parts.append(
                f"<p>Real entities only: probe {_fmt(r['probe_auroc'])}, best baseline "
                f"{html.escape(r['best_baseline'])} {_fmt(r['best_baseline_auroc'])} (margin "
                f"{_signed(r['margin'])}{_ci_text(r.get('margin_bootstrap'))}).</p>")
    held = m["heldout"]
    parts.append(f"<h2>Held-out entities</h2><p><small>{held['split']['n_test_spans']} spans "
                 f"about {held['split']['n_test_groups']} entities never seen in training "
                 f"({held['split']['n_train_spans']} training spans, "
                 f"{held['split']['n_train_groups']} entities; shared entities: "
                 f"{held['split']['shared_groups']}). Span score = max over the span's tokens. "
                 "Recall at 10% FPR is read off each scorer's own ROC curve.</small></p>")
    headers = ["scorer", "AUROC", "AUPRC", "recall@10%FPR", "ECE", "n", "fabricated", "retrieved"]
    parts.append("<h3>All held-out spans (real and invented entities)</h3>")
    parts.append(_table(headers, _scorer_rows(held["all"])))
    if held.get("real_only"):
        parts.append("<h3>Real entities only (no invented-entity questions)</h3>")
        parts.append(_table(headers, _scorer_rows(held["real_only"])))
    thr = m["threshold"]
    parts.append(f"<p>At the shipped threshold {thr['value']:.4f}: held-out FPR "
                 f"{_fmt(thr.get('test_fpr'))}, recall {_fmt(thr.get('test_recall'))}.</p>")
    for key, title in (("by_domain", "Held-out spans by domain"),
                       ("by_style", "Held-out spans by prompt style")):
        if held.get(key):
            rows = []
            for name, res in held[key].items():
                probe = res["probe"]
                probe = probe if isinstance(probe, Mapping) else probe.model_dump()
                bb = _best_baseline_auroc(res)
                rows.append([name, probe["n"], probe["n_fabrication"], probe["auroc"], bb])
            parts.append(f"<h3>{title}</h3>")
            parts.append(_table(["subset", "n", "fabricated", "probe AUROC",
                                 "best baseline AUROC"], rows))
    if m.get("cross_topic"):
        rows = []
        for name, res in m["cross_topic"].items():
            probe = res["probe"] if isinstance(res["probe"], Mapping) else res["probe"].model_dump()
            bb = _best_baseline_auroc(res)
            real = res.get("real_only", {}).get("probe") if res.get("real_only") else None
            within = res.get("within_topic") or {}
            rows.append([name, ", ".join(res["trained_on"]), probe["n"], probe["auroc"], bb,
                         _auroc(real), within.get("probe"), within.get("neg_min_logprob")])
        parts.append("<h2>Cross-topic</h2><p><small>Trained on the other domains with the "
                     "chosen layer, row and C; tested on the held-out domain. Within topics: "
                     "the mean AUROC inside each of the domain's topics (no offset between "
                     "topics helps).</small></p>")
        parts.append(_table(["held-out domain", "trained on", "n", "probe AUROC",
                             "best baseline AUROC", "probe AUROC, real entities",
                             "probe within topics", "min log-prob within topics"], rows))
    parts.append("<h2>Plots</h2>" + "".join(f"<img src='{html.escape(i)}' alt='{html.escape(i)}'>"
                                            for i in images))
    ds = m["capture"].get("labels_by_topic", {})
    if ds:
        labels = ["retrieval", "fabrication", "refusal", "ambiguous", "no_claim", "incomplete"]
        rows = [[topic] + [counts.get(lb, 0) for lb in labels] for topic, counts in ds.items()]
        totals = ["total"] + [sum(c.get(lb, 0) for c in ds.values()) for lb in labels]
        parts.append("<h2>Dataset</h2><p><small>Each question asked in the plain and chat "
                     "styles; refusals and ambiguous answers are left out of training and "
                     "evaluation. no_claim: answers no claim span carries (counted in "
                     "ambiguous too).</small></p>")
        parts.append(_table(["topic"] + labels, rows + [totals]))
    if examples:
        rows = [[e["prob"], e["label"], e["topic"], e["question"], e["answer"]] for e in examples]
        parts.append("<h2>Held-out examples</h2>")
        parts.append(_table(["p(fabrication)", "label", "topic", "question", "answer"], rows))
    cv = sorted(m["selection"]["cv_results"], key=lambda r: -(r["auroc_mean"] or 0))[:15]
    parts.append("<h2>Top CV configurations</h2>")
    parts.append(_table(["layers", "row", "C", "CV AUROC", "±"],
                        [[str(r["layers"]), r["position"], r["C"], r["auroc_mean"],
                          r["auroc_std"]] for r in cv]))
    parts.append(f"<p><small>{html.escape(m.get('command', ''))}</small></p>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _scheme_text(m: Mapping[str, Any]) -> str:
    scheme = m["selection"].get("cv_scheme", "entities")
    if scheme in _SCHEME_TEXT:
        return _SCHEME_TEXT[scheme]
    return f"entity-grouped {m['config']['cv_folds']}-fold CV"


def write_metrics(metrics: Mapping[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(to_jsonable(metrics), indent=2, sort_keys=False) + "\n",
                    encoding="utf-8")
    return path


__all__ = ["plot_calibration", "plot_cross_topic", "plot_layer_sweep", "plot_roc",
           "to_jsonable", "write_html", "write_metrics"]


def write_eval_html(metrics: Mapping[str, Any], images: Sequence[str], path: Path) -> Path:
    """Report of ``lie-detector eval``: an existing probe on a capture, against baselines."""
    headers = ["scorer", "AUROC", "AUPRC", "recall@10%FPR", "ECE", "n", "fabricated", "retrieved"]
    thr = metrics["threshold"]
    parts = [f"<!doctype html><meta charset='utf-8'><title>eval {html.escape(metrics['probe'])}"
             f"</title><style>{_CSS}</style><h1>Evaluation of <code>"
             f"{html.escape(metrics['probe'])}</code></h1>",
             f"<p>Capture <code>{html.escape(metrics['capture'])}</code>. At the probe's "
             f"threshold {thr['value']:.4f}: FPR {_fmt(thr['fpr'])}, recall "
             f"{_fmt(thr['recall'])}.</p>",
             _table(headers, _scorer_rows(metrics["all"]))]
    rows = []
    for topic, res in metrics.get("by_topic", {}).items():
        probe = res["probe"]
        bb = _best_baseline_auroc(res)
        rows.append([topic, probe["n"], probe["n_fabrication"], probe["auroc"], bb])
    if rows:
        parts.append("<h2>By topic</h2>" + _table(
            ["topic", "n", "fabricated", "probe AUROC", "best baseline AUROC"], rows))
    parts.append("".join(f"<img src='{html.escape(i)}'>" for i in images))
    parts.append(f"<p><small>{html.escape(metrics.get('note', ''))}</small></p>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
