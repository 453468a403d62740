"""Every benchmark in one command, side by side in the same run on the same machine.

    .venv/bin/python -m benchmarks.run_all            # full: writes benchmarks/results/, docs/results.md
    .venv/bin/python -m benchmarks.run_all --quick    # CI smoke run: writes a temp folder

Sections (all in ``benchmarks.json``, ``benchmarks.md`` and PNG plots in ``--out``):

* **overhead** - decode throughput, time to first token (TTFT) and inter-token latency (ITL)
  from streaming ``/v1/completions`` at several concurrency levels, for these variants of
  one vLLM server on the embedded model (same flags, one compile cache each):

  - ``a`` plugin + sidecar: capture of ``--layers`` streamed to a scoring sidecar (a
    random-weight probe on the probe layer: scoring costs what a trained probe costs);
  - ``b`` plugin alone: the same capture, nobody listening (every step is a counted drop);
  - ``c`` plugin off (``LIE_DETECTOR_DISABLE=1``): the reference;
  - ``d`` the peer ``vllm-lens`` capturing the same layers, from its own environment
    (``benchmarks/lens.py``); it forces eager mode;
  - ``e`` plugin + sidecar with ``--enforce-eager``: like-for-like with ``d``.

  Memory allows about three servers at once on the small machines this runs on, so variants
  run in *groups* that each include the reference ``c``: ``a b c`` (compiled) then ``c d e``.
  ``--all-eager`` (quick mode's default) starts every server eager, as group ``eager``.
  Within a group every server is started once and reused for every concurrency level; each
  repeat visits every level, and at each level every variant runs one round, the order
  rotated each time. Ratios are taken per repeat and level against ``c`` of the same group
  and reported as median [IQR] (min-max): noise on a shared machine hits a repeat's variants
  alike, so ratios are the result, not absolute numbers.
* **score_delay** - variant ``a`` again, with a ``StreamScores`` gRPC stream opened per
  request: for every token, client arrival time minus ``generated_unix_nano``; p50/p95/p99
  per concurrency level (dedicated rounds, so the gRPC client never weighs on the overhead
  rounds).
* **scoring** - ``benchmarks.scoring``: fused probe scoring vs the GEMM bound (and, on CUDA,
  the memory-bandwidth bound) for 1, 8 and 64 probes, on ``--scoring-device``.
* **detection** - the shipped probe's evaluation against its baselines
  (``benchmarks.detection``, read from the probe's ``metrics.json``).

A full run writes into ``benchmarks/results/`` and then runs ``benchmarks.update_readme``
(``docs/results.md`` and the README's headline); a
quick run writes to ``--out`` (default: a new temporary folder) and never touches the
committed results, docs/results.md or the README.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from benchmarks import detection as detection_mod
from benchmarks import lens as lens_mod
from benchmarks import overhead as oh
from benchmarks import streaming

logger = logging.getLogger("benchmarks.run_all")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SERVER_MEMORY_GIB = 4.0  # measured: API + EngineCore + worker of one server on the embedded model


@dataclass(frozen=True)
class Variant:
    key: str
    name: str
    label: str
    plugin: bool = False
    sidecar: bool = False
    eager: bool = False
    lens: bool = False

    @property
    def short(self) -> str:
        return f"({self.key}) {self.name}"


VARIANTS = {
    "a": Variant("a", "plugin + sidecar", "capture streamed to a scoring sidecar",
                 plugin=True, sidecar=True),
    "b": Variant("b", "plugin alone", "capture on, no sidecar listening (steps dropped)",
                 plugin=True),
    "c": Variant("c", "plugin off", "LIE_DETECTOR_DISABLE=1 (reference)"),
    "d": Variant("d", "vllm-lens", "vllm-lens 1.3.0 capturing the same layers (forces eager)",
                 eager=True, lens=True),
    "e": Variant("e", "plugin + sidecar, eager", "as (a) with --enforce-eager (like-for-like "
                 "with vllm-lens)", plugin=True, sidecar=True, eager=True),
}
REFERENCE = "c"


# --------------------------------------------------------------------------- statistics
def spread(values: list[float]) -> dict[str, Any] | None:
    """median [IQR] (min-max) of per-repeat values."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    q = (statistics.quantiles(vals, n=4, method="inclusive") if len(vals) >= 2
         else [vals[0]] * 3)
    return {"median": statistics.median(vals), "q1": q[0], "q3": q[2], "min": vals[0],
            "max": vals[-1], "n": len(vals), "values": values}


def percentiles(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    arr = np.asarray(values, dtype=float)
    out = {f"p{q}": float(np.percentile(arr, q)) for q in qs}
    out.update(mean=float(arr.mean()), max=float(arr.max()), min=float(arr.min()),
               n=int(arr.size))
    return out


# --------------------------------------------------------------------------- one group
@dataclass
class Group:
    name: str
    variants: list[str]
    eager_note: str
    servers: dict[str, oh.Server] = field(default_factory=dict)
    sidecars: dict[str, oh.Sidecar] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    variants_all: list[str] = field(default_factory=list)  # as asked, before any failure

    def __post_init__(self) -> None:
        self.variants_all = list(self.variants)


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="ld-bench-"))
        self.model_dir: Path | None = None
        self.rounds: list[dict[str, Any]] = []      # every measured overhead round
        self.delay_rounds: list[dict[str, Any]] = []
        self.lens_info: dict[str, Any] = {"status": "skipped",
                                          "reason": "not asked for (--with-lens)"}
        self.notes: list[str] = []
        self.startup_s: dict[str, float] = {}
        self.server_logs: dict[str, Any] = {}

    # ----------------------------------------------------------------- servers
    def start_group(self, group: Group, procs: oh.ProcessGroups) -> None:
        args, model_dir = self.args, self.model_dir
        assert model_dir is not None
        gdir = self.workdir / group.name
        gdir.mkdir(parents=True, exist_ok=True)
        need = len(group.variants) * SERVER_MEMORY_GIB + 1.0
        avail = mem_available_gib()
        deadline = time.monotonic() + args.memory_wait
        while avail is not None and avail < need and time.monotonic() < deadline:
            logger.info("waiting for memory: %.1f GiB available, %.0f GiB wanted", avail, need)
            time.sleep(10)
            avail = mem_available_gib()
        if avail is not None and avail < need:
            note = (f"group {group.name}: {avail:.1f} GiB memory available, about {need:.0f} "
                    "GiB wanted for its servers; started anyway")
            logger.warning(note)
            self.notes.append(note)
        t0 = time.monotonic()
        probe = oh.make_random_probe(model_dir, gdir / "probe", layer=args.probe_layer)
        lens_python = None
        if "d" in group.variants:
            try:
                lens_python = lens_mod.ensure_lens_env(args.lens_venv,
                                                       log_path=gdir / "lens-install.log")
            except lens_mod.LensUnavailable as exc:
                self.fail_lens(group, f"install/import failed: {exc}")
        for key in list(group.variants):
            v = VARIANTS[key]
            channel = f"ipc://{gdir}/channels/{key}.sock"  # made owner-only by the sidecar
            if v.sidecar:
                group.sidecars[key] = oh.start_sidecar(procs, channel, gdir, probe, model_dir,
                                                       name=f"sidecar-{key}")
            if v.lens:
                if lens_python is None:
                    continue
                server = oh.start_vllm(
                    procs, f"vllm-{key}-lens", model_dir, gdir, channel, plugin=False,
                    layers=args.layers, python=lens_python, extra_env=lens_mod.lens_env(),
                    cache_variant="vllm-lens")
            else:
                eager = v.eager or args.all_eager
                cache = ("plugin-on-L" + "_".join(map(str, args.layers)) if v.plugin
                         else "plugin-off") + ("-eager" if eager else "")
                server = oh.start_vllm(procs, f"vllm-{key}", model_dir, gdir, channel,
                                       plugin=v.plugin, layers=args.layers,
                                       enforce_eager=eager, cache_variant=cache)
            group.servers[key] = server
        for key, server in list(group.servers.items()):
            try:
                oh.wait_vllm(server)
            except RuntimeError as exc:
                if VARIANTS[key].lens:
                    self.fail_lens(group, f"server did not start: {exc}")
                    oh._killpg(server.proc, signal.SIGKILL)
                    del group.servers[key]
                    continue
                raise
        self.startup_s[group.name] = round(time.monotonic() - t0, 1)
        logger.info("group %s up in %.0f s", group.name, self.startup_s[group.name])
        if "d" in group.servers:
            server = group.servers["d"]
            check = lens_mod.verify_http_capture(server.base_url, server.model, args.layers,
                                                 lens_mod.lens_python(args.lens_venv))
            notes = oh.vllm_log_notes(server.log_path)
            text = server.log_path.read_text(errors="replace")
            check["forced_eager"] = "Enforce eager set" in text
            check["log_errors"] = notes["error_lines"][:10]
            self.lens_info.update(verification=check)
            if not check.get("ok"):
                self.fail_lens(group, f"capture over HTTP failed: {check.get('error')}")
                oh._killpg(server.proc, signal.SIGKILL)
                del group.servers["d"]
            else:
                self.lens_info.update(status="ran", reason=None)
                logger.info("vllm-lens captured over HTTP: %s", check)

    def fail_lens(self, group: Group, reason: str) -> None:
        logger.warning("vllm-lens: %s", reason)
        self.lens_info.update(status="failed", reason=reason)
        group.failures["d"] = reason
        if "d" in group.variants:
            group.variants.remove("d")

    # ----------------------------------------------------------------- rounds
    def extra_for(self, key: str) -> dict[str, Any] | None:
        return lens_mod.request_extra(self.args.layers) if VARIANTS[key].lens else None

    def warm_up(self, group: Group, client: httpx.Client) -> None:
        for key in group.variants:
            server = group.servers[key]
            for level in self.args.concurrency:
                streaming.run_round(client, server.base_url, server.model,
                                    streaming.prompts_for(90_000 + level, level),
                                    min(8, self.args.max_tokens), extra=self.extra_for(key),
                                    tag=f"warmup-{key}")
            oh.quiet_until(time.monotonic(), self.args.gap)
        for key, sidecar in group.sidecars.items():
            oh.settle(sidecar.metrics_url)
            got = oh.scrape(sidecar.metrics_url).get("lie_detector_steps_received_total", 0)
            if got <= 0:
                raise RuntimeError(f"sidecar of ({key}) received no steps during warm-up: "
                                   "capture is not working (see its vLLM log)")

    def measure_group(self, group: Group) -> None:
        args = self.args
        roots = {key: s.proc.pid for key, s in group.servers.items()}
        roots.update({f"sidecar-{k}": s.proc.pid for k, s in group.sidecars.items()})
        limits = httpx.Limits(max_connections=4 * max(args.concurrency),
                              max_keepalive_connections=4 * max(args.concurrency))
        from tqdm.auto import tqdm

        with httpx.Client(timeout=600, limits=limits) as client:
            self.warm_up(group, client)
            order = []
            for r in range(args.repeats):
                for li, level in enumerate(args.concurrency):
                    shift = (r + li) % len(group.variants)  # each level, each repeat
                    keys = group.variants[shift:] + group.variants[:shift]
                    order += [(r, li, level, key) for key in keys]
            for r, li, level, key in tqdm(order, desc=f"group {group.name}", unit="round",
                                          disable=None):
                if key not in group.servers:  # a peer that failed mid-run
                    continue
                self.one_round(group, client, roots, r, li, level, key)
            if "a" in group.servers and not args.skip_delay:
                self.delay_group(group, client)

    def one_round(self, group: Group, client: httpx.Client, roots: dict[str, int], r: int,
                  li: int, level: int, key: str) -> None:
        args = self.args
        server = group.servers[key]
        sidecar = group.sidecars.get(key)
        before_m = oh.scrape(sidecar.metrics_url) if sidecar else {}
        before_cpu = oh.cpu_snapshot(roots)
        try:
            rt = streaming.run_round(client, server.base_url, server.model,
                                     streaming.prompts_for(1000 * r + li, level),
                                     args.max_tokens, extra=self.extra_for(key),
                                     tag=f"r{r}-{key}")
        except Exception as exc:
            if VARIANTS[key].lens:
                self.fail_lens(group, f"round failed: {exc!r}\n"
                               + "\n".join(server.log_path.read_text(errors="replace")
                                           .splitlines()[-30:]))
                del group.servers[key]
                return
            raise
        end = time.monotonic()
        cpu = oh.cpu_delta(oh.cpu_snapshot(roots), before_cpu)
        side: dict[str, float] = {}
        if sidecar:
            after_m = oh.settle(sidecar.metrics_url)
            for name, metric in (("steps", "lie_detector_steps_received_total"),
                                 ("hook_seconds", "lie_detector_hook_step_seconds_sum"),
                                 ("hook_count", "lie_detector_hook_step_seconds_count"),
                                 ("rows_scored", "lie_detector_rows_scored_total"),
                                 ("dropped_steps", "lie_detector_channel_dropped_steps_total")):
                side[name] = oh.delta(after_m, before_m, metric)
        ttfts = [q.ttft_s for q in rt.requests]
        gaps = [g for q in rt.requests for g in q.itl_s]
        self.rounds.append({
            "group": group.name, "variant": key, "repeat": r, "concurrency": level,
            "wall_s": rt.wall_s, "completion_tokens": rt.completion_tokens,
            "tokens_per_s": rt.tokens_per_s,
            "ttft_s": ttfts, "ttft_median_s": statistics.median(ttfts),
            "itl_median_s": statistics.median(gaps) if gaps else None,
            "itl_mean_s": statistics.fmean(gaps) if gaps else None,
            "itl_p95_s": percentiles(gaps).get("p95"), "itl_p99_s": percentiles(gaps).get("p99"),
            "request_mean_itl_s": [q.mean_itl_s for q in rt.requests],
            "cpu_s": cpu, "sidecar": side,
        })
        logger.info("%s c=%d r=%d: %.1f tok/s, TTFT %.0f ms, ITL %.1f ms", VARIANTS[key].short,
                    level, r, rt.tokens_per_s, 1e3 * statistics.median(ttfts),
                    1e3 * (statistics.median(gaps) if gaps else float("nan")))
        oh.quiet_until(end, args.gap)

    def delay_group(self, group: Group, client: httpx.Client) -> None:
        args = self.args
        server, sidecar = group.servers["a"], group.sidecars["a"]
        for level in args.concurrency:
            for k in range(args.delay_rounds):
                before = oh.scrape(sidecar.metrics_url)
                rt = streaming.run_round(client, server.base_url, server.model,
                                         streaming.prompts_for(50_000 + 100 * level + k, level),
                                         args.max_tokens, grpc_address=sidecar.grpc_address,
                                         tag=f"delay{k}")
                end = time.monotonic()
                after = oh.settle(sidecar.metrics_url)
                gaps = [g for q in rt.requests for g in q.itl_s]
                self.delay_rounds.append({
                    "concurrency": level, "round": k, "tokens_per_s": rt.tokens_per_s,
                    "delays_s": [round(d, 6) for q in rt.requests for d in q.score_delays_s],
                    "first_token_delays_s": [q.first_token_delay_s for q in rt.requests
                                             if q.first_token_delay_s is not None],
                    "unscored_delays_s": [round(d, 6) for q in rt.requests
                                          for d in q.unscored_delays_s],
                    "tokens_generated": rt.completion_tokens,
                    "tokens_received": sum(q.scores_received for q in rt.requests),
                    "streams_final": sum(q.score_stream_final for q in rt.requests),
                    "stream_errors": [q.score_stream_error for q in rt.requests
                                      if q.score_stream_error],
                    "itl_median_s": statistics.median(gaps) if gaps else None,
                    "sidecar_delay_sum_s": oh.delta(after, before,
                                                    "lie_detector_score_delay_seconds_sum"),
                    "sidecar_delay_count": oh.delta(after, before,
                                                    "lie_detector_score_delay_seconds_count"),
                })
                d = self.delay_rounds[-1]
                logger.info("score delay c=%d: %d tokens, p50 %.1f ms", level,
                            len(d["delays_s"]),
                            1e3 * (percentiles(d["delays_s"]).get("p50") or float("nan")))
                oh.quiet_until(end, args.gap)

    def run_group(self, group: Group) -> None:
        procs = oh.ProcessGroups()
        try:
            self.start_group(group, procs)
            if len(group.variants) < 2:
                self.notes.append(f"group {group.name}: nothing to compare with "
                                  f"{REFERENCE} ({group.failures})")
                return
            self.measure_group(group)
            for name, proc in procs.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited early with status {proc.returncode}")
        finally:
            for key, server in group.servers.items():
                self.server_logs[f"{group.name}/{key}"] = oh.vllm_log_notes(server.log_path)
            for key, sc in group.sidecars.items():
                self.server_logs[f"{group.name}/sidecar-{key}"] = oh.vllm_log_notes(sc.log_path)
            procs.stop_all()


def mem_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- summaries
def summarise_overhead(rounds: list[dict[str, Any]], groups: list[Group]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in groups:
        g_rounds = [r for r in rounds if r["group"] == group.name]
        levels = sorted({r["concurrency"] for r in g_rounds})
        keys = [k for k in VARIANTS if any(r["variant"] == k for r in g_rounds)]
        gsum: dict[str, Any] = {}
        for key in keys:
            per_level: dict[str, Any] = {}
            for level in levels:
                mine = {r["repeat"]: r for r in g_rounds
                        if r["variant"] == key and r["concurrency"] == level}
                ref = {r["repeat"]: r for r in g_rounds
                       if r["variant"] == REFERENCE and r["concurrency"] == level}
                both = sorted(set(mine) & set(ref))
                ttft = [t for r in mine.values() for t in r["ttft_s"]]
                entry = {
                    "repeats": len(mine),
                    "tokens_per_s": spread([r["tokens_per_s"] for r in mine.values()]),
                    "ttft_s": percentiles(ttft),
                    "itl_median_s": spread([r["itl_median_s"] for r in mine.values()]),
                    "itl_p95_s": spread([r["itl_p95_s"] for r in mine.values()]),
                    "itl_p99_s": spread([r["itl_p99_s"] for r in mine.values()]),
                    "others_cores": spread([r["cpu_s"].get("others", 0.0) / r["wall_s"]
                                            for r in mine.values()]),
                }
                if key != REFERENCE:
                    entry["ratio_vs_reference"] = {
                        "throughput": spread([mine[i]["tokens_per_s"] / ref[i]["tokens_per_s"]
                                              for i in both]),
                        "ttft": spread([mine[i]["ttft_median_s"] / ref[i]["ttft_median_s"]
                                        for i in both]),
                        "itl": spread([mine[i]["itl_median_s"] / ref[i]["itl_median_s"]
                                       for i in both if ref[i]["itl_median_s"]]),
                    }
                    if key == "d" and "e" in keys:  # like-for-like: vllm-lens vs our eager run
                        ours = {r["repeat"]: r for r in g_rounds
                                if r["variant"] == "e" and r["concurrency"] == level}
                        b2 = sorted(set(mine) & set(ours))
                        entry["ratio_vs_e"] = {
                            "throughput": spread([mine[i]["tokens_per_s"]
                                                  / ours[i]["tokens_per_s"] for i in b2]),
                            "ttft": spread([mine[i]["ttft_median_s"] / ours[i]["ttft_median_s"]
                                            for i in b2]),
                            "itl": spread([mine[i]["itl_median_s"] / ours[i]["itl_median_s"]
                                           for i in b2 if ours[i]["itl_median_s"]]),
                        }
                sides = [r["sidecar"] for r in mine.values() if r["sidecar"]]
                if sides:
                    steps = sum(s["steps"] for s in sides)
                    hook = sum(s["hook_seconds"] for s in sides)
                    wall = sum(r["wall_s"] for r in mine.values())
                    entry["hook"] = {
                        "steps": steps, "hook_ms_per_step": 1e3 * hook / steps if steps else None,
                        "hook_share_of_wall": hook / wall if wall else None,
                        "rows_scored": sum(s["rows_scored"] for s in sides),
                        "dropped_steps": sum(s["dropped_steps"] for s in sides),
                        "sidecar_cores": sum(r["cpu_s"].get(f"sidecar-{key}", 0.0)
                                             for r in mine.values()) / wall if wall else None,
                    }
                per_level[str(level)] = entry
            gsum[key] = per_level
        out[group.name] = {"variants": group.variants_all, "failures": group.failures,
                           "eager_note": group.eager_note, "by_variant": gsum}
    return out


def summarise_delay(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for level in sorted({r["concurrency"] for r in rounds}):
        mine = [r for r in rounds if r["concurrency"] == level]
        delays = [d for r in mine for d in r["delays_s"]]
        firsts = [d for r in mine for d in r["first_token_delays_s"]]
        count = sum(r["sidecar_delay_count"] for r in mine)
        out[str(level)] = {
            "rounds": len(mine),
            "scored_tokens": len(delays),
            "tokens_generated": sum(r["tokens_generated"] for r in mine),
            "tokens_received": sum(r["tokens_received"] for r in mine),
            "streams_final": sum(r["streams_final"] for r in mine),
            "stream_errors": [e for r in mine for e in r["stream_errors"]],
            "delay_s": percentiles(delays),
            "first_token_delay_s": percentiles(firsts),
            "itl_median_s": statistics.median([r["itl_median_s"] for r in mine
                                               if r["itl_median_s"] is not None] or [0.0]),
            "sidecar_step_delay_mean_s": (sum(r["sidecar_delay_sum_s"] for r in mine) / count
                                          if count else None),
        }
    return out


# --------------------------------------------------------------------------- main
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI smoke run: concurrency 4, variants a b c, 2 repeats, 16 tokens, "
                   "small scoring sizes; writes to --out (a temp folder by default)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: benchmarks/results in full mode, a new "
                   "temporary folder in quick mode)")
    p.add_argument("--concurrency", type=_int_list, default=None,
                   help="concurrent requests per round, e.g. 1,4,16 (default; quick: 4)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds per variant and level (default 6, quick 2)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens generated per request (default 64, quick 16)")
    p.add_argument("--layers", type=_int_list, default=[15],
                   help="layers captured by the plugin and by vllm-lens (default 15)")
    p.add_argument("--gap", type=float, default=2.0,
                   help="idle seconds after every round (vLLM's worker spins 1 s after its "
                   "last step; default 2)")
    p.add_argument("--delay-rounds", type=int, default=None,
                   help="score-delay rounds per level (default 3, quick 1)")
    lens = p.add_mutually_exclusive_group()
    lens.add_argument("--with-lens", dest="lens", action="store_true", default=None,
                      help="run the vllm-lens variant (default in full mode)")
    lens.add_argument("--no-lens", dest="lens", action="store_false")
    eager = p.add_mutually_exclusive_group()
    eager.add_argument("--eager-pair", dest="eager", action="store_true", default=None,
                       help="run variant (e), plugin + sidecar with --enforce-eager, beside "
                       "vllm-lens (default in full mode)")
    eager.add_argument("--no-eager-pair", dest="eager", action="store_false")
    p.add_argument("--all-eager", dest="all_eager", action="store_true", default=None,
                   help="start every server with --enforce-eager (default in quick mode: "
                   "no inductor compile, so a smoke run on a cold cache starts in a minute "
                   "rather than several; its ratios then describe eager mode)")
    p.add_argument("--lens-venv", type=Path, default=lens_mod.DEFAULT_VENV,
                   help=f"where the vllm-lens environment lives (default {lens_mod.DEFAULT_VENV})")
    p.add_argument("--scoring-probes", type=_int_list, default=[1, 8, 64])
    p.add_argument("--scoring-rows", type=int, default=None,
                   help="rows per engine step for the scoring benchmark (default 256, quick 64)")
    p.add_argument("--scoring-device", default=None,
                   help="cpu or cuda (default: cuda when torch sees one, else cpu)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: overhead, "
                   "delay, scoring, detection (development only)")
    p.add_argument("--no-readme", action="store_true",
                   help="do not regenerate docs/results.md and the README headline after a full run")
    p.add_argument("--memory-wait", type=float, default=180.0,
                   help="seconds to wait for enough free memory before starting a server group "
                   "(about 4 GiB per server; default 180, then it starts anyway and says so)")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    q = args.quick
    args.concurrency = args.concurrency or ([4] if q else [1, 4, 16])
    args.repeats = args.repeats or (2 if q else 6)
    args.max_tokens = args.max_tokens or (16 if q else 64)
    args.delay_rounds = args.delay_rounds or (1 if q else 3)
    args.scoring_rows = args.scoring_rows or (64 if q else 256)
    args.lens = (not q) if args.lens is None else args.lens
    args.eager = (not q) if args.eager is None else args.eager
    args.all_eager = q if args.all_eager is None else args.all_eager
    if args.all_eager:
        args.eager = False  # (e) would only repeat (a)
    args.probe_layer = 15 if 15 in args.layers else args.layers[0]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - {"overhead", "delay", "scoring", "detection"}
    if unknown:
        p.error(f"--skip: unknown sections {sorted(unknown)}")
    args.skip_delay = "delay" in args.skip
    if args.repeats < 1 or args.max_tokens < 2 or args.delay_rounds < 1 or args.gap < 0:
        p.error("--repeats, --delay-rounds must be >= 1, --max-tokens >= 2, --gap >= 0")
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="ld-bench-quick-")) if q else RESULTS)
    if q and args.out.resolve() == RESULTS.resolve():
        p.error("--quick never writes over the committed results; choose another --out")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    oh.setup_cli(args.verbose)
    from benchmarks import report
    from detector.models.embedded import ensure_embedded_model

    started = time.monotonic()
    mode = "quick" if args.quick else "full"
    runner = Runner(args)
    timings: dict[str, float] = {}
    load_before = os.getloadavg()
    heavy_before = oh.heavy_processes()
    logger.info("mode %s; results to %s; work folder %s", mode, args.out, runner.workdir)
    ok = False
    groups: list[Group] = []
    try:
        overhead: dict[str, Any] | None = None
        delay: dict[str, Any] | None = None
        if "overhead" not in args.skip:
            runner.model_dir = ensure_embedded_model()
            groups.append(Group(
                "eager" if args.all_eager else "compiled", ["c", "a", "b"],
                "every server --enforce-eager (--all-eager)" if args.all_eager
                else "default vLLM mode (torch.compile); same flags for all"))
            peer = ["c"] + (["d"] if args.lens else []) + (["e"] if args.eager else [])
            if len(peer) > 1:
                groups.append(Group("peer", peer, "(d) and (e) run eager ((d) forces it); "
                                    "(c) compiled, as in the first group"))
            for group in groups:
                t0 = time.monotonic()
                runner.run_group(group)
                timings[f"group_{group.name}_s"] = round(time.monotonic() - t0, 1)
            overhead = summarise_overhead(runner.rounds, groups)
            delay = summarise_delay(runner.delay_rounds) if runner.delay_rounds else None
            if not args.lens:
                runner.lens_info = {"status": "skipped",
                                    "reason": "not asked for (quick mode; --with-lens runs it)"}
        scoring_payload = None
        if "scoring" not in args.skip:
            from benchmarks import scoring

            t0 = time.monotonic()
            device = args.scoring_device or _default_device()
            scoring_payload = scoring.run(args.scoring_probes, args.scoring_rows, device,
                                          quick=args.quick)
            scoring_payload["markdown"] = scoring.to_markdown(scoring_payload["results"],
                                                              scoring_payload["machine"])
            timings["scoring_s"] = round(time.monotonic() - t0, 1)
        detection = (detection_mod.summarise() if "detection" not in args.skip
                     else {"available": False, "reason": "skipped (--skip detection)"})
        timings["total_s"] = round(time.monotonic() - started, 1)
        result = {
            "benchmark": "run_all", "mode": mode,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run_all",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "machine": {**oh.machine_info(), "device": "cpu", "gpu": _gpu_name()},
            "source": oh.source_state(),
            "config": {
                "model": runner.model_dir.name if runner.model_dir else None,
                "dtype": "float32", "layers": args.layers, "probe_layer": args.probe_layer,
                "concurrency": args.concurrency, "repeats": args.repeats,
                "max_tokens": args.max_tokens, "gap_s": args.gap,
                "delay_rounds": args.delay_rounds, "stream_wait": "woken", "with_lens": args.lens,
                "eager_pair": args.eager, "all_eager": args.all_eager,
                "lens_version": lens_mod.LENS_VERSION,
                "vllm_args": oh.VLLM_ARGS + ["--max-model-len", str(oh.MAX_MODEL_LEN),
                                             "--no-enable-prefix-caching"],
                "variants": {k: vars(v) for k, v in VARIANTS.items()},
                "groups": [{"name": g.name, "variants": g.variants_all,
                            "note": g.eager_note} for g in groups],
                "skipped_sections": sorted(args.skip),
            },
            "overhead": overhead,
            "overhead_rounds": runner.rounds,
            "lens": runner.lens_info,
            "score_delay": delay,
            "score_delay_rounds": runner.delay_rounds,
            "scoring": scoring_payload,
            "detection": detection,
            "notes": runner.notes,
            "noise": {"loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                      "heavy_processes_before": heavy_before,
                      "heavy_processes_after": oh.heavy_processes()},
            "startup_s": runner.startup_s,
            "runtime_s": timings,
            "logs": runner.server_logs,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "benchmarks.json").write_text(json.dumps(result, indent=1) + "\n")
        plots = report.plots(result, args.out)
        result["plots"] = [p.name for p in plots]
        (args.out / "benchmarks.json").write_text(json.dumps(result, indent=1) + "\n")
        table = report.markdown(result)
        (args.out / "benchmarks.md").write_text(table)
        (args.out / "detection.md").write_text(detection_mod.markdown(detection))
        logger.info("wrote %s (%s)", args.out, ", ".join(
            ["benchmarks.json", "benchmarks.md", "detection.md", *result["plots"]]))
        print(table)
        if (mode == "full" and args.out.resolve() == RESULTS.resolve() and not args.no_readme
                and not args.skip):
            from benchmarks import update_readme

            logger.info("results page updated: %s", ", ".join(update_readme.update()))
        ok = True
        return 0
    except KeyboardInterrupt:
        logger.warning("interrupted; servers stopped")
        return 130
    finally:
        if args.keep_logs or not ok:
            logger.info("logs kept in %s", runner.workdir)
        else:
            shutil.rmtree(runner.workdir, ignore_errors=True)
        logger.info("run_all finished in %.0f s", time.monotonic() - started)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    sys.exit(main())
