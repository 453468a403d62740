"""CI smoke run of the benchmarks: ``python -m benchmarks.run_all --quick`` end to end.

It starts its own vLLM servers and sidecar (three servers at once), so it is slow and marked
``vllm``. The assertions are about shape and sanity, never about speed: every section is
there, ratios are finite and positive, latencies positive, percentiles ordered, scoring
throughput positive, and the committed results and README are left alone.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICK_TIMEOUT_S = 840


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_spread(s: dict, what: str) -> None:
    assert s is not None, f"{what}: missing"
    assert s["n"] >= 1, what
    for k in ("median", "q1", "q3", "min", "max"):
        assert _finite_pos(s[k]), f"{what}.{k} = {s[k]!r}"
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"], f"{what}: {s}"


def _check_percentiles(p: dict, what: str) -> None:
    for k in ("p50", "p95", "p99"):
        assert _finite_pos(p.get(k)), f"{what}.{k} = {p.get(k)!r}"
    assert p["p50"] <= p["p95"] <= p["p99"] <= p["max"], f"{what}: {p}"


@pytest.mark.vllm
def test_run_all_quick(tmp_path: Path) -> None:
    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks/results").glob("*")}
    readme_before = (ROOT / "README.md").read_text()
    page_before = (ROOT / "docs/results.md").read_text()
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=QUICK_TIMEOUT_S)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])

    result = json.loads((out / "benchmarks.json").read_text())
    assert result["mode"] == "quick"
    for section in ("machine", "config", "overhead", "lens", "score_delay", "scoring",
                    "detection", "runtime_s"):
        assert result.get(section) is not None, f"section {section!r} missing"
    assert result["machine"]["vllm"] and result["machine"]["cpus_usable"] >= 1

    # Overhead: a, b, c at every level; ratios vs c finite and positive; latencies positive.
    levels = [str(n) for n in result["config"]["concurrency"]]
    assert result["config"]["all_eager"], "quick mode starts every server eager"
    main_group = result["overhead"]["eager"]["by_variant"]
    assert set(main_group) == {"a", "b", "c"}, main_group.keys()
    for key, per in main_group.items():
        assert sorted(per) == sorted(levels), (key, per.keys())
        for level, e in per.items():
            what = f"overhead.{key}.{level}"
            _check_spread(e["tokens_per_s"], f"{what}.tokens_per_s")
            _check_spread(e["itl_median_s"], f"{what}.itl_median_s")
            _check_percentiles(e["ttft_s"], f"{what}.ttft_s")
            if key != "c":
                for metric in ("throughput", "ttft", "itl"):
                    _check_spread(e["ratio_vs_reference"][metric], f"{what}.ratio.{metric}")
            if key == "a":
                assert e["hook"]["steps"] > 0 and e["hook"]["rows_scored"] > 0, e["hook"]
    assert result["lens"]["status"] in ("skipped", "ran", "failed")
    assert result["lens"]["reason"] or result["lens"]["status"] == "ran"

    # Score delay: every level, ordered percentiles, every token's score reached the client.
    delay = result["score_delay"]
    assert sorted(delay) == sorted(levels)
    for level, e in delay.items():
        assert e["scored_tokens"] > 0 and not e["stream_errors"], e
        _check_percentiles(e["delay_s"], f"score_delay.{level}")
        assert e["tokens_received"] == e["tokens_generated"], e
        assert e["streams_final"] == e["rounds"] * int(level), e

    # Scoring: 1, 8 and 64 probes, positive rows/s against a positive bound, device named.
    scoring = result["scoring"]
    assert scoring["device"] and [r["probes"] for r in scoring["results"]] == [1, 8, 64]
    for r in scoring["results"]:
        assert _finite_pos(r["fused_rows_per_s"]) and _finite_pos(r["bound_rows_per_s"]), r
        assert r["device"] == scoring["device"]

    # Detection: the shipped probe's evaluation, or the reason it is absent.
    det = result["detection"]
    if det["available"]:
        assert any(r["scorer"] == "probe" for r in det["rows"])
        assert all(0 <= r["auroc"] <= 1 for r in det["rows"] if r["auroc"] is not None)
    else:
        assert det["reason"]

    # Tables and plots written; committed results and the README untouched.
    table = (out / "benchmarks.md").read_text()
    for heading in ("Overhead on vLLM", "Score delay", "Sidecar scoring", "Detection quality"):
        assert heading in table
    assert (out / "overhead.png").stat().st_size > 0
    assert (out / "score_delay.png").stat().st_size > 0
    assert list(out.glob("scoring-*.png"))
    assert (ROOT / "README.md").read_text() == readme_before
    assert (ROOT / "docs/results.md").read_text() == page_before
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks/results").glob("*")} == committed


def test_summaries_tables_and_plots_from_synthetic_rounds(tmp_path: Path) -> None:
    """The statistics, tables and plots without any server (fast; runs everywhere)."""
    import random

    from benchmarks import detection, report, run_all

    rng = random.Random(0)
    groups = [run_all.Group("compiled", ["c", "a", "b"], "compiled"),
              run_all.Group("peer", ["c", "d", "e"], "eager")]
    rounds = []
    for g in groups:
        for r in range(3):
            for level in (1, 4):
                for key in g.variants:
                    tps = 100 * level * rng.uniform(0.9, 1.1)
                    rounds.append({
                        "group": g.name, "variant": key, "repeat": r, "concurrency": level,
                        "wall_s": 1.0, "completion_tokens": 10, "tokens_per_s": tps,
                        "ttft_s": [rng.uniform(0.05, 0.1) for _ in range(level)],
                        "ttft_median_s": rng.uniform(0.05, 0.1),
                        "itl_median_s": rng.uniform(0.02, 0.03), "itl_p95_s": 0.04,
                        "itl_p99_s": 0.05, "cpu_s": {"others": 0.2},
                        "sidecar": ({"steps": 10, "hook_seconds": 0.002, "rows_scored": 10,
                                     "dropped_steps": 0} if key in ("a", "e") else {}),
                    })
    overhead = run_all.summarise_overhead(rounds, groups)
    ratio = overhead["compiled"]["by_variant"]["a"]["1"]["ratio_vs_reference"]
    assert ratio["throughput"]["n"] == 3
    assert "ratio_vs_e" in overhead["peer"]["by_variant"]["d"]["4"]
    delay_rounds = [{"concurrency": 4, "round": 0, "tokens_per_s": 1.0,
                     "delays_s": [rng.uniform(0.001, 0.05) for _ in range(40)],
                     "first_token_delays_s": [0.04] * 4, "unscored_delays_s": [],
                     "tokens_generated": 40, "tokens_received": 40, "streams_final": 4,
                     "stream_errors": [], "itl_median_s": 0.025, "sidecar_delay_sum_s": 0.1,
                     "sidecar_delay_count": 10}]
    delay = run_all.summarise_delay(delay_rounds)
    p = delay["4"]["delay_s"]
    assert p["p50"] <= p["p95"] <= p["p99"]
    result = {
        "mode": "quick", "date": "2026-01-01T00:00:00+00:00", "command": "test",
        "machine": {"cpus_usable": 2, "cpu_model": "x", "memory_gib": 1, "gpu": None,
                    "vllm": "0", "torch": "0", "python": "3"},
        "source": {"commit": "0" * 40},
        "config": {"model": "m", "dtype": "float32", "layers": [15], "probe_layer": 15,
                   "max_tokens": 16, "repeats": 3, "delay_rounds": 1, "lens_version": "1.3.0",
                   "groups": [{"name": g.name, "variants": g.variants_all, "note": g.eager_note}
                              for g in groups]},
        "overhead": overhead, "score_delay": delay, "score_delay_rounds": delay_rounds,
        "lens": {"status": "failed", "reason": "synthetic"},
        "scoring": None, "detection": detection.summarise(tmp_path / "missing.json"),
        "noise": {"loadavg_before": [0, 0, 0], "loadavg_after": [0, 0, 0]},
        "startup_s": {}, "runtime_s": {}, "notes": [],
    }
    made = report.plots(result, tmp_path)
    assert {p.name for p in made} == {"overhead.png", "score_delay.png"}
    table = report.markdown(result)
    assert "(d) / (e): vllm-lens vs ours, both eager" in table
    assert "did not run on vLLM 0: synthetic" in table
    assert "not available" in table
