"""Render the served held-out evaluation (``heldout.json``): README table, plot, and the
short summary the demo prints under its table.

Kept apart from the runner so the README can be redrawn from a results file without a
server (``benchmarks/update_readme.py`` calls :func:`markdown`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

SCORER_LABELS = {"probe": "served probe", "neg_min_logprob": "-min log-prob",
                 "neg_mean_logprob": "-mean log-prob", "mean_entropy": "mean entropy"}


def _ci(block: dict[str, Any] | None, *, signed: bool = False) -> str:
    """``point [lo, hi]`` to two places (with a sign for differences); n/a without a point."""
    if not block or block.get("point") is None:
        return "n/a"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    if block.get("lo") is None:
        return fmt.format(block["point"])
    return f"{fmt.format(block['point'])} [{fmt.format(block['lo'])}, {fmt.format(block['hi'])}]"


def _slice_rows(slices: dict[str, dict[str, Any]], name: Callable[[str], str]) -> list[str]:
    """Table rows of per-style slices (topics, domains): n, AUROCs with CIs, margin."""
    rows = []
    for style, groups in slices.items():
        for key, b in groups.items():
            a = b.get("auroc") or {}
            rows.append(
                f"| {style} | {name(key)} | {b.get('n', 0)} "
                f"({b.get('n_fabrication', 0)} / {b.get('n_retrieval', 0)}) | "
                f"{_ci(a.get('probe'))} | {_ci(a.get('neg_min_logprob'))} | "
                f"{_ci(b.get('probe_minus_baseline'), signed=True)} |")
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def markdown(result: dict[str, Any]) -> str:
    """The README block: per style, per held-out topic, verdicts, long form."""
    probe = result.get("probe") or {}
    lines = [
        f"Served path (`lie-detector serve`: vLLM + sidecar), {result.get('model', '?')}, probe "
        f"`{probe.get('name', '?')}` (threshold {probe.get('threshold', float('nan')):.2f}); "
        "held-out topics, templates and entities training never sees "
        "(`probes/datasets/heldout.py`); scores read back with `GetScores` as a client does. "
        "AUROC of the claim span that carries the answer (fabrication vs retrieval), 95% "
        "intervals from an entity bootstrap; baselines on the same claim tokens from the "
        "response's logprobs. Run " + (f"`{result['command']}`" if result.get("command")
                                       else "`python -m benchmarks.heldout`")
        + f" ({result.get('created', '?')}).",
        "",
        "| style | n (fab / ret) | served probe | -min log-prob | -mean log-prob | "
        "entropy | probe - min log-prob |",
        "| --- | ---: | --- | --- | --- | --- | --- |",
    ]
    for style, b in (result.get("styles") or {}).items():
        a = b.get("auroc") or {}
        lines.append(
            f"| {style} | {b.get('n', 0)} ({b.get('n_fabrication', 0)} / "
            f"{b.get('n_retrieval', 0)}) | {_ci(a.get('probe'))} | "
            f"{_ci(a.get('neg_min_logprob'))} | {_ci(a.get('neg_mean_logprob'))} | "
            f"{_ci(a.get('mean_entropy'))} | {_ci(b.get('probe_minus_baseline'), signed=True)} |")
    lines += ["", "At the shipped threshold (response verdict: any claim flagged):", "",
              "| style | answers (fab / ret) | correct answers flagged | fabricated caught "
              "(recall) | precision |", "| --- | ---: | ---: | ---: | ---: |"]
    for style, v in (result.get("verdicts") or {}).items():
        lines.append(f"| {style} | {v.get('answers', 0)} ({v.get('fabrication', 0)} / "
                     f"{v.get('retrieval', 0)}) | {_pct(v.get('false_flag_rate'))} | "
                     f"{_pct(v.get('recall'))} | {_pct(v.get('precision'))} |")
    topics = result.get("topics") or {}
    if topics:
        lines += ["", "Per held-out topic (real and invented subjects of one template):", "",
                  "| style | topic | n (fab / ret) | served probe | -min log-prob | "
                  "probe - min log-prob |", "| --- | --- | ---: | --- | --- | --- |"]
        lines += _slice_rows(topics, lambda fam: fam.removeprefix("heldout_"))
    domains = result.get("domains") or {}
    if domains:
        unseen = set(result.get("domains_heldout_only") or ())
        lines += ["", "Per domain (* = a domain no training topic covers):", "",
                  "| style | domain | n (fab / ret) | served probe | -min log-prob | "
                  "probe - min log-prob |", "| --- | --- | ---: | --- | --- | --- |"]
        lines += _slice_rows(domains, lambda dom: f"{dom} *" if dom in unseen else dom)
    for key, prompt, what in (
            ("longform", "Tell me about <country>: its capital, its currency and its "
             "languages.", "countries"),
            ("longform_city", "Tell me about the time in <city>: its time zone and its offset "
             "from UTC.", "cities")):
        lf = result.get(key) or {}
        if not lf:
            continue

        def share(name: str, lf: dict[str, Any] = lf) -> str:
            s = lf.get(name) or {}
            return f"{_pct(s.get('share'))} of {s.get('claims', 0)}"
        lines += ["", f"Long form ({lf.get('responses', 0)} answers to \"{prompt}\"), claim "
                  f"spans flagged: real held-out {what} {share('real_all_claims')} (claims "
                  f"matching the subject's true values {share('real_retrieval_claims')}; "
                  f"matching another's values {share('real_fabrication_claims')}); invented "
                  f"{what} {share('invented_claims')}."]
    req = result.get("requests") or {}
    al = result.get("alignment") or {}
    lines += ["", f"{req.get('sent', 0)} requests, {req.get('errors', 0)} failed, "
              f"{req.get('with_verdict', 0)} with a response verdict; "
              f"{req.get('answers_without_served_claim', 0)} labelled answers had no served "
              f"claim over the answer; token count OpenAI vs sidecar differs on "
              f"{al.get('token_count_mismatch', 0)} of {al.get('requests', 0)}."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """AUROC with intervals per style (left) and per held-out topic (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    scorers = list(SCORER_LABELS)
    width = 0.8 / len(scorers)

    def bars(ax: Any, groups: list[tuple[str, dict[str, Any]]], title: str) -> None:
        for k, scorer in enumerate(scorers):
            xs, ys, lo, hi = [], [], [], []
            for g, (_, b) in enumerate(groups):
                a = (b.get("auroc") or {}).get(scorer) or {}
                if a.get("point") is None:
                    continue
                xs.append(g + (k - (len(scorers) - 1) / 2) * width)
                ys.append(a["point"])
                lo.append(a["point"] - (a["lo"] if a.get("lo") is not None else a["point"]))
                hi.append((a["hi"] if a.get("hi") is not None else a["point"]) - a["point"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=SCORER_LABELS[scorer])
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([n for n, _ in groups], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("span AUROC")
        ax.set_title(title, fontsize=10)

    bars(axes[0], list((result.get("styles") or {}).items()), "by prompt style")
    topic_groups = [(f"{s}:{f.removeprefix('heldout_')}", b)
                    for s, fams in (result.get("topics") or {}).items() for f, b in fams.items()]
    bars(axes[1], topic_groups, "by held-out topic (short styles)")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Served held-out evaluation: {(result.get('probe') or {}).get('name', '?')}",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What ``lie-detector demo`` reads from the probe folder (``heldout.json``)."""
    v = result.get("response_verdict") or {}
    return {"source": result.get("command") or result.get("source"),
            "created": result.get("created"), "probe": result.get("probe"),
            "response_verdict": {k: v.get(k) for k in ("answers", "precision", "recall",
                                                        "false_flag_rate")},
            "styles": {s: {"auroc_probe": ((b.get("auroc") or {}).get("probe") or {}).get(
                "point"), "auroc_neg_min_logprob": ((b.get("auroc") or {}).get(
                    "neg_min_logprob") or {}).get("point")}
                for s, b in (result.get("styles") or {}).items()}}


__all__ = ["markdown", "plot", "probe_summary"]
