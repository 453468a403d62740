"""The API under many watchers: every streamed request watched by its own ``StreamScores``.

One vLLM server (plugin on) and one sidecar. For each concurrency (default 64 and 256),
rounds alternate in ABBA order between **unwatched** (the requests only) and **watched**
(each request has a ``StreamScores`` opened before it is sent). An adjacent pair uses the
same prompts and gives one throughput ratio watched / unwatched. During watched rounds a
prober sends a gRPC health check every 0.1 s (the kubelet's view) and the sidecar's resident
memory is sampled.

Reported per concurrency: score delay p50/p99 (client clock at a token's arrival minus the
end of the engine step that sampled it), health-check latency p50/p99/max and failures,
streams that completed (final update, no error, every token scored), the sidecar's peak
RSS, and the throughput ratio. The issue's goals (2 cores): score delay p99 <= 50 ms at 64,
health p99 <= 100 ms.

    .venv/bin/python -m benchmarks.watchers                 # 64 and 256, 2 pairs each
    .venv/bin/python -m benchmarks.watchers --quick         # 16 and 64, 1 pair each
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import overhead as oh
from benchmarks.stall import RssSampler
from benchmarks.streaming import prompts_for, run_round

logger = logging.getLogger("benchmarks.watchers")
RESULTS = Path(__file__).resolve().parent / "results"
MiB = 1 << 20


class HealthProber:
    """Health checks every ``interval_s`` on a channel of its own; latencies in seconds."""

    def __init__(self, address: str, interval_s: float = 0.1, timeout_s: float = 5.0) -> None:
        self.address = address
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
                    self.latencies.append(time.perf_counter() - t0)
                except grpc.RpcError as exc:
                    self.failures.append(exc.code().name)
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthProber:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from detector.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model(progress=False)
    groups = oh.ProcessGroups()
    workdir = Path(tempfile.mkdtemp(prefix="ld-watchers-"))
    channel = f"ipc://{workdir}/channel.sock"
    top = max(args.concurrency)
    vllm_args = ["--dtype", "float32", "--max-num-seqs", str(top), "--seed", "0"]
    results: dict[str, Any] = {}
    try:
        server = oh.start_vllm(groups, "vllm", model_dir, workdir, channel, plugin=True,
                               layers=oh.LAYERS, vllm_args=vllm_args,
                               extra_env={"VLLM_CPU_KVCACHE_SPACE": str(_kv_gib(top))},
                               cache_variant=f"watchers-{top}")
        oh.wait_vllm(server)
        probe = oh.make_random_probe(model_dir, workdir / "probe")
        sidecar = oh.start_sidecar(groups, channel, workdir, probe, model_dir,
                                   extra_env={"LIE_DETECTOR_MAX_STREAMS": str(top),
                                              # A stream opened for a request vLLM still
                                              # queues waits for it (1,024 queue for long).
                                              "LIE_DETECTOR_STREAM_APPEAR_WAIT_S": "600"})
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=top + 8))
        run_round(client, server.base_url, server.model, prompts_for(999, 8), args.max_tokens)
        for c in args.concurrency:
            rounds = []
            for index, (variant, pair) in enumerate(oh.abba(args.pairs)):
                watched = variant == "B"
                prompts = prompts_for(100 * c + pair, c)
                oh.settle(sidecar.metrics_url, timeout_s=60)
                time.sleep(args.gap)
                cpu0 = _cpu_s(sidecar.proc.pid)
                hist0 = _delay_buckets(sidecar.metrics_url)
                with HealthProber(sidecar.grpc_address) as prober, \
                        RssSampler(sidecar.proc.pid) as rss:
                    timing = run_round(client, server.base_url, server.model, prompts,
                                       args.max_tokens,
                                       grpc_address=sidecar.grpc_address if watched else None,
                                       tag=f"w{c}")
                oh.settle(sidecar.metrics_url, timeout_s=60)
                cpu_s = _cpu_s(sidecar.proc.pid) - cpu0
                scored = _bucket_quantiles(hist0, _delay_buckets(sidecar.metrics_url))
                reqs = timing.requests
                complete = [r for r in reqs if r.score_stream_final and not r.score_stream_error
                            and len(r.score_delays_s) == r.completion_tokens]
                rounds.append({
                    "kind": "watched" if watched else "unwatched", "pair": pair,
                    "index": index, "tokens_per_s": timing.tokens_per_s,
                    "score_delays_s": [d for r in reqs for d in r.score_delays_s],
                    "streams_complete": len(complete) if watched else None,
                    "stream_errors": sorted({r.score_stream_error for r in reqs
                                             if r.score_stream_error}) if watched else [],
                    "health_s": prober.latencies, "health_failures": prober.failures,
                    "sidecar_rss_peak_mib": rss.peak / MiB, "requests": len(reqs),
                    "sidecar_cpu_us_per_token": 1e6 * cpu_s / max(1, timing.completion_tokens),
                    "scored_delay_ms": scored})
                logger.info("c=%d round %d (%s): %.1f tok/s, health p99 %s ms%s", c, index,
                            rounds[-1]["kind"], timing.tokens_per_s,
                            _ms(_pct(prober.latencies, 0.99)),
                            f", streams complete {len(complete)}/{len(reqs)}, score delay "
                            f"p99 {_ms(_pct(rounds[-1]['score_delays_s'], 0.99))} ms"
                            if watched else "")
                logger.info("  step end -> scored in the sidecar: %s", rounds[-1]["scored_delay_ms"])
            results[str(c)] = summarise(rounds)
    finally:
        groups.stop_all()
    return {"config": {"concurrency": args.concurrency, "pairs": args.pairs,
                       "max_tokens": args.max_tokens, "layers": oh.LAYERS,
                       "vllm_args": vllm_args},
            "machine": oh.machine_info(), "source": oh.source_state(), "results": results}


def _kv_gib(concurrency: int) -> int:
    """vLLM's KV cache (GiB) for every request of a round to run at once: about 46 KiB per
    token in float32 for the embedded model, ~64 tokens a request, with room to spare; at
    least 2 (what rounds of 64 and 256 always had)."""
    return max(2, -(-concurrency * 64 * 46 * 1024 * 3 // 2 // (1 << 30)))


def _delay_buckets(url: str) -> dict[float, float]:
    """The sidecar's own score delay histogram (engine step end -> the step's rows scored in
    the store): cumulative count per bucket bound, seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            if sample.name == "lie_detector_score_delay_seconds_bucket":
                out[float(sample.labels["le"])] = float(sample.value)
    return out


def _bucket_quantiles(before: dict[float, float], after: dict[float, float]
                      ) -> dict[str, float | None]:
    """p50 and p99 (ms, each a bucket's upper bound) of the steps observed between two
    scrapes: the part of the score delay spent before the sidecar had the scores."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        bound = next((b for b, c in zip(bounds, counts) if total and c >= q * total), None)
        out[name] = None if bound is None else bound * 1000
    out["steps"] = total
    return out


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of one process, all its threads."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _pct_ms(values: list[float], q: float) -> float | None:
    p = _pct(values, q)
    return None if p is None else p * 1000


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    watched = [r for r in rounds if r["kind"] == "watched"]
    by_pair: dict[int, dict[str, dict]] = {}
    for r in rounds:
        by_pair.setdefault(r["pair"], {})[r["kind"]] = r
    ratios = [p["watched"]["tokens_per_s"] / p["unwatched"]["tokens_per_s"]
              for p in by_pair.values() if len(p) == 2]
    delays = [d for r in watched for d in r["score_delays_s"]]
    health = [h for r in watched for h in r["health_s"]]
    return {
        "ratio_watched_over_unwatched": oh._quantiles(ratios) if ratios else None,
        "tokens_per_s": {k: statistics.median(r["tokens_per_s"] for r in rounds
                                              if r["kind"] == k)
                         for k in ("watched", "unwatched")},
        "score_delay_ms": {"p50": _pct_ms(delays, 0.5), "p99": _pct_ms(delays, 0.99),
                           "n": len(delays)},
        "health_ms_watched": {"p50": _pct_ms(health, 0.5), "p99": _pct_ms(health, 0.99),
                              "max": _pct_ms(health, 1.0),
                              "n": len(health),
                              "failures": sum(len(r["health_failures"]) for r in watched)},
        "streams_complete": f"{sum(r['streams_complete'] for r in watched)}/"
                            f"{sum(r['requests'] for r in watched)}",
        "stream_errors": sorted({e for r in watched for e in r["stream_errors"]}),
        "sidecar_rss_peak_mib": max(r["sidecar_rss_peak_mib"] for r in watched),
        "scored_delay_ms_watched": {
            name: max((r["scored_delay_ms"][name] or 0.0) for r in watched)
            for name in ("p50", "p99")},
        "sidecar_cpu_us_per_token": {
            k: statistics.median(r["sidecar_cpu_us_per_token"] for r in rounds if r["kind"] == k)
            for k in ("watched", "unwatched")},
        "rounds": [{k: v for k, v in r.items() if k not in ("score_delays_s", "health_s")}
                   for r in rounds],
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"One vLLM server (plugin on, layers {c['layers']}) and a scoring sidecar; "
        f"{c['pairs']} ABBA pairs per concurrency of rounds of streamed requests x "
        f"{c['max_tokens']} tokens, **watched** (a `StreamScores` per request, opened first) "
        "vs **unwatched**; a gRPC health check every 0.1 s during watched rounds.",
        "",
        "| concurrent requests | throughput watched / unwatched (median) | score delay p50 / "
        "p99, ms | health p50 / p99 / max, ms (failures) | streams complete | sidecar RSS "
        "peak, MiB | sidecar CPU per token, µs (watched / unwatched) | of the delay, step end "
        "-> scored in the sidecar p50 / p99, ms (bucket bound) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for conc, r in result["results"].items():
        q, sd, h = r["ratio_watched_over_unwatched"], r["score_delay_ms"], r["health_ms_watched"]
        cpu, sc = r["sidecar_cpu_us_per_token"], r["scored_delay_ms_watched"]
        lines.append(
            f"| {conc} | {q['median']:.3f} | {sd['p50']:.0f} / {sd['p99']:.0f} "
            f"| {h['p50']:.0f} / {h['p99']:.0f} / {h['max']:.0f} ({h['failures']}) "
            f"| {r['streams_complete']} | {r['sidecar_rss_peak_mib']:.0f} "
            f"| {cpu['watched']:.0f} / {cpu['unwatched']:.0f} "
            f"| ≤ {sc['p50']:.1f} / ≤ {sc['p99']:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="64,256",
                        type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gap", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="16 and 64, one pair each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.pairs = [16, 64], 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    oh.setup_cli()
    result = run(args)
    oh.write_results(args.out, "watchers", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
