"""What the sidecar spends decoding one step message (no vLLM, no socket).

Every step message is decoded and validated on the sidecar's receive thread before it is
scored, so its cost is paid per engine step. Since wire version 2 a step names its engine
by id and carries the full ``EngineInfo`` only on the first step of an engine epoch and then
about once a second (``docs/design/channel.md``); the other steps are decoded against the
info the sidecar keeps per engine id. This measures ``detector.channel.wire.decode`` on
steps shaped like the test server's (SmolLM2-135M: 5 captured layers of 576, bfloat16) for
a few batch sizes: decode steps of 1, 8 and 64 requests (one row each) and one prefill
chunk of 128 rows, with and without the info in the header.

Run from the repository root (the same script measures an older checkout of the code when
``PYTHONPATH`` points at it; it then reports the "with info" case only)::

    .venv/bin/python -m benchmarks.wire_decode

Figures are printed and written to ``benchmarks/results/wire_decode.json``; nothing here
asserts a timing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from detector.channel import wire

logger = logging.getLogger("benchmarks.wire_decode")

LAYERS = [8, 15, 16, 20, 22]
HIDDEN = 576
# (label, requests, rows per request)
SHAPES = (("decode-1", 1, 1), ("decode-8", 8, 1), ("decode-64", 64, 1), ("prefill-128", 1, 128))


def _engine() -> wire.EngineInfo:
    return wire.EngineInfo(
        engine_id="0123456789abcdef0123456789abcdef", model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_path="/home/user/.cache/lie-detector/models/smollm2-135m-instruct",
        fingerprint="sha256:" + "ab" * 32, hidden_size=HIDDEN, num_layers=30, layers=LAYERS,
        dtype="bfloat16", capture_method="aux_hidden_states", pid=4242, started_at=1.7e9,
        token_features=["logprob"], vocab_size=49152, max_model_len=8192)


def _frames(engine: wire.EngineInfo, requests: int, rows_each: int, with_info: bool
            ) -> list[bytes]:
    reqs, offset = [], 0
    for i in range(requests):
        first = 40 + 3 * i if rows_each == 1 else 0
        reqs.append(wire.RequestRows(
            req_id=f"chatcmpl-{i:032x}-{i:08x}", row_offset=offset, num_rows=rows_each,
            first_position=first, num_prompt_tokens=40 if rows_each == 1 else rows_each,
            input_token_ids=[(17 * (i + j)) % 49152 for j in range(rows_each)],
            sampled_token_ids=[(31 * i) % 49152], sampled_logprobs=[-0.25]))
        offset += rows_each
    fields: dict[str, Any] = dict(engine=engine, seq=7, time_ns=1_700_000_000_000_000_000,
                                  num_rows=offset, requests=reqs, finished=[], hook_ns=1000)
    header = wire.StepHeader(**fields)
    rows = torch.zeros((len(LAYERS), offset, HIDDEN), dtype=torch.bfloat16)
    if with_info:
        return [bytes(f) for f in wire.encode_step(header, rows)]
    header = header.model_copy(update={"engine": None})  # refer to the engine by id only
    return [bytes(f) for f in wire.encode_step(header, rows, engine)]


def _per_call_us(call: Any, rounds: int, repeat: int) -> float:
    """Median over ``rounds`` of the mean time of ``repeat`` calls, in microseconds."""
    call()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(repeat):
            call()
        samples.append((time.perf_counter_ns() - t0) / repeat / 1e3)
    return statistics.median(samples)


def measure(rounds: int, repeat: int) -> dict[str, dict[str, float]]:
    engine = _engine()
    has_cache = hasattr(wire, "EngineInfoCache") and \
        "engines" in inspect.signature(wire.decode).parameters
    results: dict[str, dict[str, float]] = {}
    for label, requests, rows_each in SHAPES:
        row: dict[str, float] = {}
        if has_cache:
            cache = wire.EngineInfoCache()
            with_info = _frames(engine, requests, rows_each, True)
            wire.decode(with_info, engines=cache)  # the epoch's first step: now known
            without = _frames(engine, requests, rows_each, False)
            row["with_info_us"] = _per_call_us(lambda: wire.decode(with_info, engines=cache),
                                               rounds, repeat)
            row["without_info_us"] = _per_call_us(lambda: wire.decode(without, engines=cache),
                                                  rounds, repeat)
            row["header_bytes_with_info"] = len(with_info[0])
            row["header_bytes_without_info"] = len(without[0])
        else:
            frames = _frames(engine, requests, rows_each, True)
            row["with_info_us"] = _per_call_us(lambda: wire.decode(frames), rounds, repeat)
            row["header_bytes_with_info"] = len(frames[0])
        results[label] = row
        logger.info("%-12s %s", label, "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=400)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "wire_decode.json")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    results = {"wire_version": wire.WIRE_VERSION, "shapes": measure(args.rounds, args.repeat)}
    print(json.dumps(results, indent=2))
    if not args.no_save:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
