"""What token features (the verdict's log-probability, hybrid probes' inputs) cost the engine.

With ``LIE_DETECTOR_TOKEN_FEATURES`` set, the hook keeps the step's raw logits before
sampling (vLLM's own tensor when the sampler works on a float32 copy of it, as it does for
bfloat16 models; a copy for float32 logits, which the sampler changes in place) and picks
each request's row and sampled token; the publisher's thread computes the features later,
off the engine thread, on a core the engine is not bound to. Two measurements, one vLLM
server at most:

1. **In process** (no vLLM): the hook's own code (``vllm_adapter._snapshot_logits`` and
   ``_deferred_features``: what the engine thread runs; then the function it returns: what
   the publisher's thread runs) on logits of the served model's vocabulary for 1, 4 and 16
   running requests, greedy and sampled, bfloat16 and float32. Rounds alternate the code
   and an empty call so machine noise hits both; the result is the median difference.
2. **Served** (``--served``): one vLLM server with features on and a channel tap; each
   step's ``hook_ns`` (all the hook's engine-thread time) and the engine's step period from
   the steps' timestamps, at ``--concurrency`` greedy requests. The engine share of a step
   is (1)'s engine-thread time at that batch size over the median period.

Run from the repository root::

    .venv/bin/python -m benchmarks.token_features            # in process only (seconds)
    .venv/bin/python -m benchmarks.token_features --served   # + one vLLM server (minutes)

Figures are printed and written to ``benchmarks/results/token_features.json``; nothing
here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

logger = logging.getLogger("benchmarks.token_features")

FEATURES = ["logprob"]  # what the shipped verdict reads (detector.verdict)
BATCHES = (1, 4, 16)


def _fake_runner(logits: torch.Tensor, temperature: float) -> Any:
    """What ``_snapshot_logits`` reads of a model runner, with these logits."""
    req_ids = [f"r{i}" for i in range(logits.shape[0])]
    state = SimpleNamespace(logits=logits, spec_decode_metadata=None)
    params = SimpleNamespace(temperature=temperature)
    return SimpleNamespace(execute_model_state=state,
                           input_batch=SimpleNamespace(req_ids=req_ids, num_reqs=len(req_ids)),
                           requests={r: SimpleNamespace(sampling_params=params) for r in req_ids})


def _ab_ms(fn: Any, *, rounds: int, reps: int) -> list[float]:
    """Per-call ms of ``fn`` minus an empty call, A/B interleaved per round."""
    def nothing() -> None:
        pass

    fn()  # warm up
    a_ms, b_ms = [], []
    for r in range(rounds):
        for f in ((fn, nothing) if r % 2 == 0 else (nothing, fn)):
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            (a_ms if f is fn else b_ms).append((time.perf_counter() - t0) * 1e3 / reps)
    return [a - b for a, b in zip(a_ms, b_ms)]


def in_process(vocab: int, *, rounds: int, reps: int) -> dict[str, Any]:
    """Per-step ms of the feature code for each batch size and logits dtype, split into
    what the engine thread runs (keep the logits, pick the rows) and what the publisher's
    thread runs later (the features themselves)."""
    from detector.engine.vllm_adapter import _deferred_features, _snapshot_logits

    cap = SimpleNamespace(token_features=FEATURES)
    out: dict[str, Any] = {}
    for dtype in (torch.bfloat16, torch.float32):
        for n, temperature in [(n, t) for t in (0.0, 1.0) for n in BATCHES]:
            logits = (torch.randn(n, vocab) * 4).to(dtype)
            runner = _fake_runner(logits, temperature)
            sampled = {f"r{i}": [int(logits[i].argmax())] for i in range(n)}

            def engine_side() -> None:
                _deferred_features(cap, _snapshot_logits(runner), sampled)

            snap = _snapshot_logits(runner)
            compute = _deferred_features(cap, snap, sampled)
            engine = _ab_ms(engine_side, rounds=rounds, reps=reps)
            sender = _ab_ms(compute, rounds=rounds, reps=reps)
            key = f"{n}-{'greedy' if temperature == 0 else 'sampled'}-{str(dtype)[6:]}"
            out[key] = {"engine_ms_per_step_median": round(statistics.median(engine), 4),
                        "sender_ms_per_step_median": round(statistics.median(sender), 4)}
            logger.info("%2d requests (%s): engine thread %.3f ms, publisher thread %.3f ms "
                        "per step (median of %d rounds)", n, key, statistics.median(engine),
                        statistics.median(sender), rounds)
    return out


def served(concurrency: int, max_tokens: int) -> dict[str, Any]:
    """One vLLM server with features on: hook time and step period per decode step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import ChannelTap, complete_many, start_vllm  # test helpers: one server

    from benchmarks.streaming import prompts_for
    from detector.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model(progress=False)
    work = Path(tempfile.mkdtemp(prefix="ld-token-features-"))
    server = start_vllm(model_dir, work,
                        env_extra={"LIE_DETECTOR_TOKEN_FEATURES": ",".join(FEATURES)})
    try:
        tap = ChannelTap(server.channel)
        try:
            tap.wait_connected(server.base_url)
            complete_many(server.base_url, [{"prompt": p, "max_tokens": 8}
                                            for p in prompts_for(999, concurrency)])  # warm-up
            first = len(tap.steps)
            complete_many(server.base_url, [{"prompt": p, "max_tokens": max_tokens,
                                             "ignore_eos": True}
                                            for p in prompts_for(0, concurrency)])
            time.sleep(1.0)
        finally:
            tap.close()
    finally:
        server.stop()
    steps = [s for s in tap.steps[first:] if s.requests]
    full = [s for s in steps if len(s.requests) == concurrency
            and all(r.num_rows == 1 for r in s.requests)]  # pure decode steps, full batch
    periods = [(b.time_ns - a.time_ns) / 1e6 for a, b in zip(full, full[1:])
               if b.seq == a.seq + 1]
    with_feats = sum(1 for s in full for r in s.requests if r.sampled_logprobs is not None)
    return {"decode_steps": len(full),
            "tokens_with_features": with_feats,
            "hook_ms_per_step_median": round(statistics.median(s.hook_ns for s in full) / 1e6, 4),
            "step_period_ms_median": round(statistics.median(periods), 3) if periods else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.token_features", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--served", action="store_true", help="also run one vLLM server")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in process (default 1: steadier on a shared box)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    vocab = 49152  # SmolLM2's vocabulary (the embedded model)
    result: dict[str, Any] = {
        "benchmark": "token_features", "features": FEATURES, "vocab": vocab,
        "torch_threads": torch.get_num_threads(), "loadavg_before": list(os.getloadavg()),
        "in_process": in_process(vocab, rounds=args.rounds, reps=args.reps),
    }
    if args.served:
        result["served"] = srv = served(args.concurrency, args.max_tokens)
        cost = result["in_process"].get(f"{args.concurrency}-greedy-bfloat16", {}).get(
            "engine_ms_per_step_median")
        if cost is not None and srv["step_period_ms_median"]:
            srv["engine_share_of_step_pct"] = round(100 * cost / srv["step_period_ms_median"], 3)
        logger.info("served: %s", srv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "token_features.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))  # noqa: T201 - the benchmark's report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
