"""What asking for the verdict in the response costs: time to last byte with and without
``X-Lie-Detector: annotate`` (detector.serving.openai_middleware).

One ``serve``-like pair: a sidecar with the shipped probe and one vLLM server with the plugin
and ``--middleware detector.serving.openai_middleware.LieDetectorMiddleware``. For each concurrency
(default 1 and 16) and each of non-streamed and streamed ``/v1/completions``, rounds run in
ABBA order between **plain** (no header) and **annotated** (the header): a round sends that
many distinct greedy requests at once (``ignore_eos``, fixed ``max_tokens``, so both halves
generate the same tokens), and each request's time to last byte is taken on the client.
An adjacent pair shares its prompts and gives one ratio annotated / plain of the median time
to last byte; the median ratio over pairs is the result, and the absolute medians are shown
beside it. Annotated responses that came back without a verdict are counted (a verdict
that timed out would make annotation look cheap).

The extra time is the wait, after vLLM finished, for the sidecar to have scored the last
tokens and answer ``GetScores`` (and for a stream, one more event).

    .venv/bin/python -m benchmarks.annotation              # 1 and 16, 3 pairs each
    .venv/bin/python -m benchmarks.annotation --quick      # 1 and 16, 1 pair each
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks import overhead as oh
from benchmarks.streaming import prompts_for

logger = logging.getLogger("benchmarks.annotation")
RESULTS = Path(__file__).resolve().parent / "results"
HEADER = {"X-Lie-Detector": "annotate"}


def one_request(client: httpx.Client, base_url: str, model: str, prompt: str,
                max_tokens: int, *, stream: bool, annotate: bool) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}
    t0 = time.perf_counter()
    with client.stream("POST", f"{base_url}/v1/completions", json=body,
                       headers=HEADER if annotate else {}) as resp:
        raw = b"".join(resp.iter_bytes())
    ttlb = time.perf_counter() - t0
    resp.raise_for_status()
    status = None
    if annotate and not stream:
        status = resp.headers.get("x-lie-detector-verdict")
        if status != "ok":
            status = resp.headers.get("x-lie-detector-reason", "missing")
    elif annotate:
        events = [e for e in raw.split(b"\n\n") if e]
        try:
            field = json.loads(events[-2].removeprefix(b"data: "))["lie_detector"]
            status = "ok" if field["status"] == "ok" else field.get("reason", "?")
        except (IndexError, KeyError, ValueError):
            status = "missing"
    return {"ttlb_s": ttlb, "status": status}


def run_round(client: httpx.Client, base_url: str, model: str, prompts: list[str],
              max_tokens: int, *, stream: bool, annotate: bool) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(one_request, client, base_url, model, p, max_tokens,
                               stream=stream, annotate=annotate) for p in prompts]
        return [f.result() for f in futures]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from detector.artifact import default_probe_dir, load_probe
    from detector.models.embedded import ensure_embedded_model

    probe = default_probe_dir()
    if probe is None:
        raise SystemExit("the shipped probe is not built (lie-detector train-default)")
    layers = sorted(load_probe(probe).metadata.layers)
    model_dir = ensure_embedded_model(progress=False)
    groups = oh.ProcessGroups()
    workdir = Path(tempfile.mkdtemp(prefix="ld-annotation-"))
    channel = f"ipc://{workdir}/channel.sock"
    top = max(args.concurrency)
    vllm_args = ["--dtype", "float32", "--max-num-seqs", str(max(16, top)), "--seed", "0"]
    results: dict[str, Any] = {}
    results_example: dict[str, Any] = {}
    try:
        sidecar = oh.start_sidecar(groups, channel, workdir, probe, model_dir)
        # ServeOptions' default (annotate) adds --middleware, as `lie-detector serve` does.
        server = oh.start_vllm(groups, "vllm", model_dir, workdir, channel, plugin=True,
                               layers=layers, vllm_args=vllm_args,
                               extra_env={"LIE_DETECTOR_ANNOTATE_GRPC_ADDRESS":
                                          sidecar.grpc_address},
                               cache_variant="annotation")
        oh.wait_vllm(server)
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=top + 8))
        for stream in (False, True):  # warm-up: both paths, both variants
            for annotate in (False, True):
                run_round(client, server.base_url, server.model, prompts_for(999, 2),
                          args.max_tokens, stream=stream, annotate=annotate)
        example = httpx.post(f"{server.base_url}/v1/chat/completions", headers=HEADER,
                             timeout=300, json={
                                 "model": server.model, "max_tokens": 24, "temperature": 0.0,
                                 "messages": [{"role": "user",
                                               "content": "What is the capital of France?"}]})
        results_example = {"content": example.json()["choices"][0]["message"]["content"],
                           "lie_detector": example.json().get("lie_detector"),
                           "headers": {k: v for k, v in example.headers.items()
                                       if k.startswith("x-lie-detector")}}
        for c in args.concurrency:
            for stream in (False, True):
                rounds = []
                for index, (variant, pair) in enumerate(oh.abba(args.pairs)):
                    annotate = variant == "B"
                    time.sleep(args.gap)
                    reqs = run_round(client, server.base_url, server.model,
                                     prompts_for(100 * c + pair + (50 if stream else 0), c),
                                     args.max_tokens, stream=stream, annotate=annotate)
                    ttlb = statistics.median(r["ttlb_s"] for r in reqs)
                    rounds.append({"kind": "annotated" if annotate else "plain", "pair": pair,
                                   "index": index, "ttlb_median_s": ttlb,
                                   "ttlb_s": [r["ttlb_s"] for r in reqs],
                                   "statuses": [r["status"] for r in reqs if annotate]})
                    logger.info("c=%d %s round %d (%s): median time to last byte %.0f ms", c,
                                "streamed" if stream else "non-streamed", index,
                                rounds[-1]["kind"], ttlb * 1000)
                results[f"{c}-{'stream' if stream else 'json'}"] = summarise(c, stream, rounds)
    finally:
        groups.stop_all()
    return {"config": {"concurrency": args.concurrency, "pairs": args.pairs,
                       "max_tokens": args.max_tokens, "layers": layers, "probe": probe.name,
                       "vllm_args": vllm_args},
            "machine": oh.machine_info(), "source": oh.source_state(),
            "example": results_example, "results": results}


def summarise(c: int, stream: bool, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    by_pair: dict[int, dict[str, dict]] = {}
    for r in rounds:
        by_pair.setdefault(r["pair"], {})[r["kind"]] = r
    ratios = [p["annotated"]["ttlb_median_s"] / p["plain"]["ttlb_median_s"]
              for p in by_pair.values() if len(p) == 2]
    statuses = [s for r in rounds for s in r["statuses"]]
    return {
        "concurrency": c, "stream": stream,
        "ratio_annotated_over_plain": oh._quantiles(ratios),
        "ttlb_ms": {k: 1000 * statistics.median(t for r in rounds if r["kind"] == k
                                                for t in r["ttlb_s"])
                    for k in ("plain", "annotated")},
        "verdicts_ok": f"{statuses.count('ok')}/{len(statuses)}",
        "unavailable_reasons": sorted({s for s in statuses if s != "ok"}),
        "rounds": rounds,
    }


def markdown(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [
        f"One vLLM server (plugin on, layers {c['layers']}, `--middleware "
        f"detector.serving.openai_middleware.LieDetectorMiddleware`) and a sidecar with the "
        f"shipped probe; {c['pairs']} ABBA pairs per row of rounds of greedy `/v1/completions` x "
        f"{c['max_tokens']} tokens, **annotated** (`X-Lie-Detector: annotate`) vs **plain**; "
        "time to last byte per request on the client.",
        "",
        "| concurrent requests | response | time to last byte annotated / plain (median "
        "ratio) | plain, ms (median) | annotated, ms (median) | verdicts ok |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"].values():
        q, t = r["ratio_annotated_over_plain"], r["ttlb_ms"]
        lines.append(f"| {r['concurrency']} | {'streamed' if r['stream'] else 'JSON'} "
                     f"| {q['median']:.3f} | {t['plain']:.0f} | {t['annotated']:.0f} "
                     f"| {r['verdicts_ok']} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16",
                        type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--gap", type=float, default=1.5)
    parser.add_argument("--quick", action="store_true", help="one pair per row")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs = 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    oh.setup_cli()
    result = run(args)
    oh.write_results(args.out, "annotation", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
