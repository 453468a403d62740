"""What a stalled sidecar costs vLLM: decode throughput and worker memory with the sidecar
scoring vs. stopped with SIGSTOP while the hook's queue is full.

One vLLM server (plugin on) and one sidecar on its channel. Rounds alternate in ABBA order
between **running** (the sidecar scores every step) and **stalled** (the sidecar is stopped,
and a fill batch has run first so the hook's queue is full and every new step is dropped:
the steady state of a hung sidecar). Each round sends ``--concurrency`` greedy requests of
``--max-tokens`` tokens with ``ignore_eos``; an adjacent (running, stalled) pair uses the same
prompts and gives one ratio stalled / running of tokens per second. After a stalled round the
sidecar is continued and drains its backlog before the next round starts.

The server's queue is set small (``--queue-steps``, default 64) so that a short fill batch
fills it; the default queue (1024 steps) behaves the same once full, it just takes longer to
get there. The vLLM worker's resident memory is sampled every 0.2 s during every round.

    .venv/bin/python -m benchmarks.stall            # 6 pairs
    .venv/bin/python -m benchmarks.stall --quick    # 2 pairs
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks import overhead as oh
from benchmarks.streaming import prompts_for

logger = logging.getLogger("benchmarks.stall")
RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20


def worker_pid(server: oh.Server) -> int:
    """vLLM's worker (it runs the model and the hook): a descendant of the API server."""
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            if "VLLM::Worker" in p.name() or "VLLM::Worker" in " ".join(p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    raise RuntimeError("vLLM worker process not found")


class RssSampler:
    """Peak resident memory of one process while a round runs."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def dropped(sidecar: oh.Sidecar) -> float:
    return oh.scrape(sidecar.metrics_url).get("lie_detector_channel_dropped_steps_total", 0.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = _model_dir()
    groups = oh.ProcessGroups()
    workdir = Path(tempfile.mkdtemp(prefix="lie-detector-stall-"))
    channel = f"ipc://{workdir}/channel.sock"
    rounds: list[dict[str, Any]] = []
    try:
        server = oh.start_vllm(groups, "vllm", model_dir, workdir, channel, plugin=True,
                               layers=oh.LAYERS,
                               extra_env={"LIE_DETECTOR_QUEUE_STEPS": str(args.queue_steps)})
        oh.wait_vllm(server)
        probe = oh.make_random_probe(model_dir, workdir / "probe")
        sidecar = oh.start_sidecar(groups, channel, workdir, probe, model_dir)
        worker = worker_pid(server)
        client = httpx.Client(timeout=300)
        # Warm-up: compile paths, caches, the sidecar's first steps.
        oh.run_round(client, server, prompts_for(999, args.concurrency), args.max_tokens)
        oh.settle(sidecar.metrics_url)
        for index, (variant, pair) in enumerate(oh.abba(args.pairs)):
            kind = "running" if variant == "A" else "stalled"
            prompts = prompts_for(pair, args.concurrency)
            dropped_before = dropped(sidecar)
            if kind == "stalled":
                os.kill(sidecar.proc.pid, signal.SIGSTOP)
                # Fill the queue: enough steps that new ones can only be dropped.
                oh.run_round(client, server, prompts_for(500 + pair, args.concurrency),
                             args.queue_steps + 128)
            time.sleep(args.gap)
            with RssSampler(worker) as rss:
                wall, tokens, _ = oh.run_round(client, server, prompts, args.max_tokens)
            if kind == "stalled":
                os.kill(sidecar.proc.pid, signal.SIGCONT)
            # The sidecar catches up (a stalled one drains its backlog) before the next round.
            oh.settle(sidecar.metrics_url, timeout_s=60)
            rounds.append({"kind": kind, "pair": pair, "index": index, "wall_s": wall,
                           "tokens": tokens, "tokens_per_s": tokens / wall,
                           "worker_rss_peak_mib": rss.peak / MiB,
                           "steps_dropped": dropped(sidecar) - dropped_before})
            logger.info("round %d (%s, pair %d): %.1f tok/s, worker RSS peak %.0f MiB", index,
                        kind, pair, tokens / wall, rss.peak / MiB)
    finally:
        groups.stop_all()
    return summarise(rounds, args)


def _model_dir() -> Path:
    from detector.models.embedded import ensure_embedded_model

    return ensure_embedded_model(progress=False)


def summarise(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by_pair: dict[int, dict[str, dict]] = {}
    for r in rounds:
        by_pair.setdefault(r["pair"], {})[r["kind"]] = r
    ratios = [p["stalled"]["tokens_per_s"] / p["running"]["tokens_per_s"]
              for p in by_pair.values() if len(p) == 2]
    rss = {k: [r["worker_rss_peak_mib"] for r in rounds if r["kind"] == k]
           for k in ("running", "stalled")}
    return {
        "config": {"concurrency": args.concurrency, "max_tokens": args.max_tokens,
                   "pairs": args.pairs, "queue_steps": args.queue_steps, "gap_s": args.gap,
                   "layers": oh.LAYERS, "vllm_args": oh.VLLM_ARGS},
        "machine": oh.machine_info(),
        "source": oh.source_state(),
        "rounds": rounds,
        "ratio_stalled_over_running": oh._quantiles(ratios),
        "tokens_per_s": {k: statistics.median(r["tokens_per_s"] for r in rounds
                                              if r["kind"] == k) for k in ("running", "stalled")},
        "worker_rss_peak_mib": {k: {"median": statistics.median(v), "max": max(v)}
                                for k, v in rss.items()},
        "steps_dropped": {k: sum(r["steps_dropped"] for r in rounds if r["kind"] == k)
                          for k in ("running", "stalled")},
    }


def markdown(result: dict[str, Any]) -> str:
    c, q = result["config"], result["ratio_stalled_over_running"]
    rss = result["worker_rss_peak_mib"]
    tps = result["tokens_per_s"]
    return "\n".join([
        f"One vLLM server (plugin on, layers {c['layers']}, queue {c['queue_steps']} steps) and "
        f"a scoring sidecar; {c['pairs']} ABBA pairs of rounds of {c['concurrency']} requests "
        f"x {c['max_tokens']} tokens, sidecar **running** vs **stalled** (SIGSTOP, queue "
        "already full, every step dropped). Ratio = stalled / running tokens per second of "
        "the same pair: median [IQR] (min-max).",
        "",
        "| throughput stalled / running | tok/s running (median) | tok/s stalled (median) | "
        "worker RSS peak running, MiB (median / max) | worker RSS peak stalled, MiB "
        "(median / max) | steps dropped, running / stalled rounds |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {q['median']:.3f} [{q['q1']:.3f}-{q['q3']:.3f}] ({q['min']:.3f}-{q['max']:.3f}) "
        f"| {tps['running']:.1f} | {tps['stalled']:.1f} "
        f"| {rss['running']['median']:.0f} / {rss['running']['max']:.0f} "
        f"| {rss['stalled']['median']:.0f} / {rss['stalled']['max']:.0f} "
        f"| {result['steps_dropped']['running']:.0f} / {result['steps_dropped']['stalled']:.0f} |",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--queue-steps", type=int, default=64)
    parser.add_argument("--gap", type=float, default=2.0,
                        help="quiet seconds before each round (vLLM's worker polls for 1 s "
                             "after its last step)")
    parser.add_argument("--quick", action="store_true", help="2 pairs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    oh.setup_cli()
    result = run(args)
    oh.write_results(args.out, "stall", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
