"""Tables (Markdown) and plots (PNG) from ``benchmarks.json`` as ``benchmarks.run_all`` writes it.

    .venv/bin/python -m benchmarks.report benchmarks/results   # redraw from a results folder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import detection as detection_mod

NAMES = {"a": "plugin + sidecar", "b": "plugin alone (no sidecar)", "c": "plugin off",
         "d": "vllm-lens 1.3.0", "e": "plugin + sidecar, eager"}
COLORS = {"a": "tab:blue", "b": "tab:green", "c": "tab:gray", "d": "tab:red", "e": "tab:purple"}


def _ms(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{1e3 * x:.{digits}f}"


def _spread(s: dict[str, Any] | None, digits: int = 3) -> str:
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f} (1 repeat)"
    return (f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}-{s['q3']:.{digits}f}] "
            f"({s['min']:.{digits}f}-{s['max']:.{digits}f})")


def _machine_line(r: dict[str, Any]) -> str:
    m = r["machine"]
    gpu = m.get("gpu") or "no GPU"
    return (f"{m['cpus_usable']} CPU cores ({m['cpu_model']}), {m.get('memory_gib')} GiB, {gpu}; "
            f"vLLM {m['vllm']}, torch {m['torch']}, Python {m['python']}")


def overhead_markdown(r: dict[str, Any]) -> list[str]:
    ov, cfg = r.get("overhead"), r["config"]
    if not ov:
        return ["Overhead: not measured in this run (skipped).", ""]
    layers = ",".join(map(str, cfg["layers"]))
    lines = [
        f"Device: `cpu` ({_machine_line(r)}). {cfg['model']} {cfg['dtype']}; streaming "
        f"`/v1/completions`, greedy, `ignore_eos`, {cfg['max_tokens']} tokens per request, "
        f"N requests sent at once; {cfg['repeats']} repeats per variant and N, interleaved "
        f"(each repeat visits every N; at each N every variant runs once, order rotated). "
        f"Capture of layer(s) {layers} in (a), (b), (d), (e); the sidecar scores one "
        f"random-weight probe on layer {cfg['probe_layer']}. Ratio = variant / (c) of the same "
        "repeat, N and server group: median [IQR] (min-max) over repeats. Throughput ratio below "
        "1, or TTFT/ITL ratio above 1, means slower than plain vLLM.",
        "",
        "| variant | N | throughput / (c) | TTFT / (c) | ITL / (c) | tok/s, median | "
        "TTFT p50 / p95 ms | ITL p50 ms (median round) |",
        "| --- | ---: | --- | --- | --- | ---: | ---: | ---: |",
    ]
    notes = []
    for gname, g in ov.items():
        tag = " [peer group]" if gname == "peer" else ""
        for key in ["c", "a", "b", "e", "d"]:
            if key not in g["by_variant"]:
                continue
            for level, e in g["by_variant"][key].items():
                rat = e.get("ratio_vs_reference") or {}
                ref = key == "c"
                lines.append(
                    f"| ({key}) {NAMES[key]}{tag if key == 'c' else ''} | {level} | "
                    f"{'1 (reference)' if ref else _spread(rat.get('throughput'))} | "
                    f"{'1' if ref else _spread(rat.get('ttft'))} | "
                    f"{'1' if ref else _spread(rat.get('itl'))} | "
                    f"{e['tokens_per_s']['median']:.1f} | "
                    f"{_ms(e['ttft_s'].get('p50'), 0)} / {_ms(e['ttft_s'].get('p95'), 0)} | "
                    f"{_ms(e['itl_median_s']['median'])} |")
        if "d" in g["by_variant"] and any("ratio_vs_e" in e for e in g["by_variant"]["d"].values()):
            for level, e in g["by_variant"]["d"].items():
                rv = e.get("ratio_vs_e")
                if rv:
                    lines.append(f"| (d) / (e): vllm-lens vs ours, both eager | {level} | "
                                 f"{_spread(rv.get('throughput'))} | {_spread(rv.get('ttft'))} | "
                                 f"{_spread(rv.get('itl'))} | | | |")
        if g.get("failures"):
            for k, why in g["failures"].items():
                notes.append(f"({k}) did not run: {why.splitlines()[0][:400]}")
    lines.append("")
    groups = r["config"].get("groups") or []
    lines.append("Server groups (all servers of a group run at once; the machine's memory allows "
                 "about three): " + "; ".join(
                     f"`{g['name']}` = {', '.join('(' + v + ')' for v in g['variants'])}: "
                     f"{g['note']}" for g in groups) + "." + (
                     " vllm-lens forces eager mode, so (d) / (c) mixes the cost of "
                     "eager mode with the cost of capture; (e) runs our plugin + sidecar eager "
                     "too, so (d) / (e) is the like-for-like comparison of the two captures."
                     if any(g["name"] == "peer" for g in groups) else ""))
    others = [f"`{gname}` {_spread(e['others_cores'], 2)}"
              for gname, g in ov.items() for key, per in g["by_variant"].items() if key == "c"
              for e in list(per.values())[:1] if e.get("others_cores")]
    if others:
        lines += ["", "CPU used by other processes on the machine during the reference rounds "
                     "(cores, median [IQR] (min-max); a sign of how shared the machine was): "
                     + "; ".join(others) + "."]
    lines.append("")
    hooks = []
    for gname, g in ov.items():
        for key, per in g["by_variant"].items():
            for level, e in per.items():
                h = e.get("hook")
                if h:
                    hook_ms = ("n/a" if h["hook_ms_per_step"] is None
                               else f"{h['hook_ms_per_step']:.3f}")
                    cores = "n/a" if h["sidecar_cores"] is None else f"{h['sidecar_cores']:.2f}"
                    hooks.append(
                        f"| ({key}) {NAMES[key]} | {level} | {hook_ms} | "
                        f"{100 * (h['hook_share_of_wall'] or 0):.2f} % | {h['steps']:.0f} | "
                        f"{h['dropped_steps']:.0f} | {h['rows_scored']:.0f} | {cores} |")
    if hooks:
        lines += ["Plugin time inside the engine thread (from the sidecar's "
                  "`lie_detector_hook_step_seconds`) and the sidecar's own CPU, over the measured "
                  "rounds:", "",
                  "| variant | N | hook ms / step | hook share of wall time | steps received | "
                  "steps dropped | rows scored | sidecar CPU (cores) |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *hooks, ""]
    lens = r.get("lens") or {}
    status = lens.get("status")
    if status == "ran":
        v = lens.get("verification") or {}
        lines.append(
            f"vllm-lens {cfg.get('lens_version')} ran on vLLM {r['machine']['vllm']} over HTTP "
            f"from its own environment (`benchmarks/lens.py`): a non-streamed check request "
            f"returned residual-stream activations of shape {v.get('shape')} (expected layers x "
            f"rows {v.get('expected')}); it forced eager mode: {v.get('forced_eager')}. Every (d) "
            "request carries `\"vllm_xargs\": {\"output_residual_stream\": "
            f"{cfg['layers']}}}`. With streaming `/v1/completions`, vllm-lens still captures and "
            "fetches the rows into the API process when a request finishes, but 1.3.0 attaches "
            "them only to non-streamed completions (and chat streams), so (d) does not pay for "
            "serialising them into the response.")
    elif status == "failed":
        lines.append(f"vllm-lens {cfg.get('lens_version')} did not run on vLLM "
                     f"{r['machine']['vllm']}: {lens.get('reason')}")
    else:
        lines.append(f"vllm-lens: skipped in this run ({lens.get('reason')}).")
    lines += [""] + [f"Note: {n}" for n in notes + list(r.get("notes") or [])]
    return lines


def _first_token_note(cfg: dict[str, Any]) -> str:
    """How a stream opened before its request found it, in the sidecar that was measured."""
    if cfg.get("stream_wait") == "woken":
        return ("A stream opened before its request exists is woken by the step that first "
                "mentions it (`RequestStore.wait_known`).")
    return ("The first token's delay is larger because, in the sidecar measured here, a stream "
            "opened before its request existed polled for it every 50 ms; the sidecar now wakes "
            "it on the step that first mentions the request (`RequestStore.wait_known`), not "
            "measured yet.")


def delay_markdown(r: dict[str, Any]) -> list[str]:
    d = r.get("score_delay")
    if not d:
        return ["Score delay: not measured in this run.", ""]
    cfg = r["config"]
    lines = [
        f"Device: `cpu` (sidecar scoring on the CPU, one thread). Variant (a); a `StreamScores` "
        f"gRPC stream per request, opened before the request is sent; delay = the client's clock "
        f"when a `TokenScore` arrives minus its `generated_unix_nano` (end of the engine step that "
        f"sampled the token). {cfg['delay_rounds']} dedicated round(s) per N (not the overhead "
        f"rounds) x {cfg['max_tokens']} tokens per request. The random probe scores at the "
        "`producer` position (same step); a probe at the `own` position (the shipped one) "
        "settles one engine step later, i.e. about one ITL more. " + _first_token_note(cfg),
        "",
        "| N | scored tokens | p50 ms | p95 ms | p99 ms | max ms | first token p50 ms | "
        "ITL p50 ms (same rounds) | sidecar step-end to scored, mean ms | streams complete |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level, e in d.items():
        p = e["delay_s"]
        lines.append(
            f"| {level} | {e['scored_tokens']} | {_ms(p.get('p50'))} | {_ms(p.get('p95'))} | "
            f"{_ms(p.get('p99'))} | {_ms(p.get('max'))} | "
            f"{_ms(e['first_token_delay_s'].get('p50'))} | {_ms(e['itl_median_s'])} | "
            f"{_ms(e['sidecar_step_delay_mean_s'], 2)} | "
            f"{e['streams_final']} / {int(e['rounds']) * int(level)} |")
    errors = [x for e in d.values() for x in e["stream_errors"]]
    if errors:
        lines += ["", f"Stream errors ({len(errors)}): {errors[0]}"]
    return lines + [""]


def scoring_markdown(r: dict[str, Any]) -> list[str]:
    s = r.get("scoring")
    if not s:
        return ["Scoring throughput: not measured in this run.", ""]
    lines = [s["markdown"].rstrip(), ""]
    if s["device"].startswith("cpu"):
        lines.append("The bound is a bare `torch.mm` of the same shape on rows already laid out "
                     "for it, timed interleaved with the fused scorer in the same process. "
                     "GPU: no GPU figure exists for this run (no CUDA device on this machine); "
                     "`--scoring-device cuda` measures one and adds its memory-bandwidth bound, "
                     "labelled with the device.")
    return lines + [""]


def markdown(r: dict[str, Any]) -> str:
    rt = r.get("runtime_s") or {}
    head = [
        f"All benchmarks of one run (`{r['command']}`, {r['mode']} mode, {r['date'][:10]}, "
        f"commit {str((r.get('source') or {}).get('commit'))[:10]}). Machine: "
        f"{_machine_line(r)}. Load average before / after: "
        f"{'/'.join(f'{x:.1f}' for x in r['noise']['loadavg_before'])} / "
        f"{'/'.join(f'{x:.1f}' for x in r['noise']['loadavg_after'])} (the machine was shared: "
        "compare ratios, not absolute figures). Raw numbers: `benchmarks.json`.",
        "",
        "#### Overhead on vLLM: throughput, time to first token, inter-token latency",
        "",
        *overhead_markdown(r),
        "",
        "#### Score delay: token generated to its score at a streaming gRPC client",
        "",
        *delay_markdown(r),
        "#### Sidecar scoring throughput",
        "",
        *scoring_markdown(r),
        "#### Detection quality",
        "",
        detection_mod.markdown(r["detection"]).rstrip(),
        "",
        "Runtime: " + ", ".join(
            [f"start-up of group {k} {v:.0f} s" for k, v in (r.get("startup_s") or {}).items()]
            + [f"{k.removesuffix('_s').replace('_', ' ')} {v:.{1 if v < 10 else 0}f} s"
               for k, v in rt.items()])
        + f". Plots: {', '.join(f'`{p}`' for p in r.get('plots', [])) or 'none'}.",
        "",
    ]
    return "\n".join(head)


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(r: dict[str, Any], out: Path) -> list[Path]:
    made: list[Path] = []
    for fn in (_plot_overhead, _plot_delay, _plot_scoring, _plot_detection):
        path = fn(r, out)
        if path is not None:
            made.append(path)
    return made


def _plot_overhead(r: dict[str, Any], out: Path) -> Path | None:
    ov = r.get("overhead")
    if not ov:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    metrics = [("throughput", "decode throughput / (c)"), ("ttft", "TTFT / (c)"),
               ("itl", "ITL / (c)")]
    levels = sorted({int(lv) for g in ov.values() for per in g["by_variant"].values()
                     for lv in per})
    xs = {lv: i for i, lv in enumerate(levels)}
    keys = [k for k in ("a", "b", "e", "d") if any(k in g["by_variant"] for g in ov.values())]
    width = 0.8 / max(1, len(keys))
    for ax, (metric, title) in zip(axes, metrics):
        found = []
        for j, key in enumerate(keys):
            per = next(g["by_variant"][key] for g in ov.values() if key in g["by_variant"])
            for lv, e in per.items():
                s = (e.get("ratio_vs_reference") or {}).get(metric)
                if s:
                    found.append((xs[int(lv)] - 0.4 + width * (j + 0.5), key, lv, s))
        if not found:
            continue
        # The axis spans the IQRs (outliers would flatten everything else); points beyond it
        # are drawn as triangles on the edge.
        lo = min([1.0] + [s["q1"] for *_, s in found])
        hi = max([1.0] + [s["q3"] for *_, s in found])
        pad = 0.6 * (hi - lo) + 0.02
        bottom, top = lo - pad, hi + pad
        for x, key, lv, s in found:
            vals = [v for v in s["values"] if v is not None]
            inside = [v for v in vals if bottom <= v <= top]
            ax.scatter([x] * len(inside), inside, s=12, color=COLORS[key], alpha=0.5)
            for v, edge, marker in [(v, top, "^") for v in vals if v > top] + [
                    (v, bottom, "v") for v in vals if v < bottom]:
                ax.scatter([x], [edge], marker=marker, s=30, color=COLORS[key])
                ax.annotate(f"{v:.2f}", (x, edge), fontsize=6, ha="left",
                            va="top" if marker == "^" else "bottom",
                            xytext=(3, 0), textcoords="offset points")
            ax.hlines(s["median"], x - width / 2, x + width / 2, color=COLORS[key], lw=2.5,
                      label=f"({key}) {NAMES[key]}" if int(lv) == levels[0] else None)
        ax.set_ylim(bottom, top)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(levels)), [str(lv) for lv in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(keys), fontsize=8)
    fig.suptitle(f"Overhead vs plain vLLM (c), device cpu, {r['mode']} mode, {r['date'][:10]}: "
                 "per-repeat ratios (dots) and medians (bars)", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path = out / "overhead.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_delay(r: dict[str, Any], out: Path) -> Path | None:
    rounds = r.get("score_delay_rounds") or []
    if not rounds:
        return None
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for level in sorted({x["concurrency"] for x in rounds}):
        vals = np.sort([1e3 * d for x in rounds if x["concurrency"] == level
                        for d in x["delays_s"]])
        if vals.size:
            ax.plot(vals, np.arange(1, vals.size + 1) / vals.size, label=f"N = {level}")
    ax.set_xscale("log")
    ax.set_xlabel("score delay (ms): token generated to score at the gRPC client")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(f"Score delay, sidecar on cpu, {r['mode']} mode, {r['date'][:10]}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "score_delay.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_scoring(r: dict[str, Any], out: Path) -> Path | None:
    s = r.get("scoring")
    if not s:
        return None
    plt = _plt()
    res = s["results"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    x = range(len(res))
    ax.bar([i - 0.2 for i in x], [e["fused_rows_per_s"] for e in res], 0.4, label="fused scorer")
    ax.bar([i + 0.2 for i in x], [e["bound_rows_per_s"] for e in res], 0.4,
           label="GEMM bound (torch.mm)")
    if all("bandwidth_bound_rows_per_s" in e for e in res):
        ax.plot(list(x), [e["bandwidth_bound_rows_per_s"] for e in res], "k_", ms=30, mew=2,
                label="memory-bandwidth bound")
    ax.set_xticks(list(x), [str(e["probes"]) for e in res])
    ax.set_xlabel("probes")
    ax.set_ylabel("rows / s")
    ax.set_yscale("log")
    name = s["machine"].get("gpu") or s["machine"].get("cpu", "")
    ax.set_title(f"Sidecar scoring on {s['device']} ({name}, {s['machine']['threads']} thread(s)), "
                 f"{s['rows_per_step']} rows/step", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"scoring-{s['device'].split(':')[0]}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_detection(r: dict[str, Any], out: Path) -> Path | None:
    d = r.get("detection") or {}
    if not d.get("available"):
        return None
    plt = _plt()
    rows = d["rows"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    cols = [("auroc", "held-out"), ("auroc_real_only", "real entities only"),
            ("auroc_cross_topic_mean", "unseen topic (mean)")]
    w = 0.8 / len(rows)
    for j, row in enumerate(rows):
        ax.bar([i - 0.4 + w * (j + 0.5) for i in range(len(cols))],
               [row[c] or 0 for c, _ in cols], w, label=row["label"])
    rnd = d.get("random_direction") or {}
    if rnd.get("auroc_mean"):
        ax.axhline(rnd["auroc_mean"], color="gray", ls=":", label="random directions (mean)")
    ax.set_xticks(range(len(cols)), [c[1] for c in cols])
    ax.set_ylim(0.5, 1.12)
    ax.set_ylabel("AUROC (span level)")
    ax.set_title(f"Detection quality: {d.get('name')} vs baselines", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    path = out / "detection.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    result = json.loads((folder / "benchmarks.json").read_text())
    result["plots"] = [p.name for p in plots(result, folder)]
    (folder / "benchmarks.md").write_text(markdown(result))
    print(markdown(result))
