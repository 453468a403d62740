"""What the sidecar spends decoding one step message (no vLLM, no socket).

Every step message is decoded and validated on the sidecar's receive thread before it is
scored, so its cost is paid per engine step. Since wire version 2 a step names its engine
by id and carries the full ``EngineInfo`` only on the first step of an engine epoch and then
about once a second (``docs/design/channel.md``); the other steps are decoded against the
info the sidecar keeps per engine id. This measures ``detector.channel.wire.decode`` on
steps shaped like the test server's (SmolLM2-135M: 5 captured layers of 576, bfloat16) for
a few batch sizes: decode steps of 1, 8 and 64 requests (one row each) and one prefill
chunk of 128 rows, with and without the info in the header.

Run from the repository root; ``--baseline`` names an older ``wire.py`` (wire version 1,
every step carrying its info), measured in the same process, rounds interleaved with this
one's so that machine noise hits both::

    .venv/bin/python -m benchmarks.wire_decode
    git show d6bb731:detector/channel/wire.py > /tmp/wire_v1.py
    .venv/bin/python -m benchmarks.wire_decode --baseline /tmp/wire_v1.py

Figures are printed and written to ``benchmarks/results/wire_decode.json``; nothing here
asserts a timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from detector.channel import wire

logger = logging.getLogger("benchmarks.wire_decode")

LAYERS = [8, 15, 16, 20, 22]
HIDDEN = 576
# (label, requests, rows per request)
SHAPES = (("decode-1", 1, 1), ("decode-8", 8, 1), ("decode-64", 64, 1), ("prefill-128", 1, 128))


def _engine(w: ModuleType) -> Any:
    return w.EngineInfo(
        engine_id="0123456789abcdef0123456789abcdef", model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_path="/home/user/.cache/lie-detector/models/smollm2-135m-instruct",
        fingerprint="sha256:" + "ab" * 32, hidden_size=HIDDEN, num_layers=30, layers=LAYERS,
        dtype="bfloat16", capture_method="aux_hidden_states", pid=4242, started_at=1.7e9,
        token_features=["logprob"], vocab_size=49152, max_model_len=8192)


def _frames(w: ModuleType, requests: int, rows_each: int, with_info: bool) -> list[bytes]:
    engine = _engine(w)
    reqs, offset = [], 0
    for i in range(requests):
        first = 40 + 3 * i if rows_each == 1 else 0
        reqs.append(w.RequestRows(
            req_id=f"chatcmpl-{i:032x}-{i:08x}", row_offset=offset, num_rows=rows_each,
            first_position=first, num_prompt_tokens=40 if rows_each == 1 else rows_each,
            input_token_ids=[(17 * (i + j)) % 49152 for j in range(rows_each)],
            sampled_token_ids=[(31 * i) % 49152], sampled_logprobs=[-0.25]))
        offset += rows_each
    header = w.StepHeader(engine=engine, seq=7, time_ns=1_700_000_000_000_000_000,
                          num_rows=offset, requests=reqs, finished=[], hook_ns=1000)
    rows = torch.zeros((len(LAYERS), offset, HIDDEN), dtype=torch.bfloat16)
    if with_info:
        return [bytes(f) for f in w.encode_step(header, rows)]
    header = header.model_copy(update={"engine": None})  # refer to the engine by id only
    return [bytes(f) for f in w.encode_step(header, rows, engine)]


def _cases(w: ModuleType, prefix: str, requests: int, rows_each: int
           ) -> dict[str, tuple[Callable[[], Any], int]]:
    """name -> (one decode, header bytes) for module ``w``."""
    if not hasattr(w, "EngineInfoCache"):  # wire version 1: every step carries its info
        frames = _frames(w, requests, rows_each, True)
        return {f"{prefix}with_info": (lambda: w.decode(frames), len(frames[0]))}
    cache = w.EngineInfoCache()
    with_info = _frames(w, requests, rows_each, True)
    w.decode(with_info, cache)  # the epoch's first step: the engine is known from now on
    without = _frames(w, requests, rows_each, False)
    return {f"{prefix}with_info": (lambda: w.decode(with_info, cache), len(with_info[0])),
            f"{prefix}without_info": (lambda: w.decode(without, cache), len(without[0]))}


def measure(rounds: int, repeat: int, baseline: ModuleType | None = None
            ) -> dict[str, dict[str, float]]:
    """Per shape: the median over ``rounds`` of the mean µs of ``repeat`` decodes, for each
    case, the cases' rounds interleaved; and each case's header size in bytes."""
    results: dict[str, dict[str, float]] = {}
    for label, requests, rows_each in SHAPES:
        cases = _cases(wire, "", requests, rows_each)
        if baseline is not None:
            cases.update(_cases(baseline, "baseline_", requests, rows_each))
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for call, _ in cases.values():
            call()
        for _ in range(rounds):
            for name, (call, _) in cases.items():
                t0 = time.perf_counter_ns()
                for _ in range(repeat):
                    call()
                samples[name].append((time.perf_counter_ns() - t0) / repeat / 1e3)
        row: dict[str, float] = {}
        for name, (_, size) in cases.items():
            row[f"{name}_us"] = round(statistics.median(samples[name]), 2)
            row[f"{name}_header_bytes"] = size
        results[label] = row
        logger.info("%-12s %s", label, "  ".join(f"{k} {v:g}" for k, v in row.items()))
    return results


def _load_baseline(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_wire", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=400)
    parser.add_argument("--baseline", type=Path, help="an older wire.py to compare with")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "wire_decode.json")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    baseline = _load_baseline(args.baseline) if args.baseline else None
    results: dict[str, Any] = {
        "wire_version": wire.WIRE_VERSION,
        "baseline_wire_version": baseline.WIRE_VERSION if baseline else None,
        "shapes": measure(args.rounds, args.repeat, baseline)}
    print(json.dumps(results, indent=2))
    if not args.no_save:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
