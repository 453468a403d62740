"""CPU per stream update: the request's analysis from scratch vs advanced incrementally.

No vLLM, no gRPC: one request's tokens go through the real store one step per token, and
after each step the analysis is read as one watching stream and one GetScores would (the
settled view, then every token). **scratch** copies the request and analyses it anew
(``Analyzer.analyse``, what the sidecar did before ``Analyzer.current``); **incremental**
reads ``Analyzer.current``. Reported per answer length: CPU (thread time) per update and
the total over the answer; scratch grows with the answer (quadratic in total), incremental
should not. The real tokenizer of the embedded model, three probes.

    .venv/bin/python -m benchmarks.analysis_step                 # 32, 256, 1024, 2048 tokens
    .venv/bin/python -m benchmarks.analysis_step --lengths 64,512
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from typing import Any

import numpy as np

from detector.channel.wire import EngineInfo, RequestRows, StepHeader
from detector.sidecar.analysis import Analyzer
from detector.sidecar.scores import columns_for, rows_to_score
from detector.sidecar.store import RequestStore
from detector.sidecar.text import TextDecoder

logger = logging.getLogger("benchmarks.analysis_step")

ENGINE = EngineInfo(engine_id="e1", model="tiny", hidden_size=4, num_layers=6, layers=[1],
                    dtype="float32", capture_method="forward_hook", pid=1, started_at=0.0)
COLUMNS = columns_for(["a", "b", "c"], ["producer", "own", "producer"], [0.5, 0.5, 0.5])
PARAGRAPH = ("The capital of France is Paris. It was founded by the Romans in 52 BC, and "
             "King Louis XIV of France built Versailles in 1682.\n")


def _step(seq: int, req_id: str, first: int, inputs: list[int], n_prompt: int,
          sampled: list[int], rng: random.Random) -> tuple[StepHeader, np.ndarray, np.ndarray]:
    rows = RequestRows(req_id=req_id, row_offset=0, num_rows=len(inputs), first_position=first,
                       input_token_ids=inputs, num_prompt_tokens=n_prompt,
                       sampled_token_ids=sampled)
    header = StepHeader(kind="step", engine=ENGINE, seq=seq, time_ns=1000 + seq,
                        num_rows=len(inputs), requests=[rows], finished=[], hook_ns=0,
                        dropped_total=0)
    index = rows_to_score(header)
    probs = np.array([[rng.random() for _ in range(3)] for _ in index],
                     dtype=np.float32).reshape(len(index), 3)
    return header, index, probs


def measure(decoder: TextDecoder, n_tokens: int, incremental: bool) -> dict[str, float]:
    """Feed ``n_tokens`` one step each; CPU seconds of the reads after each step."""
    rng = random.Random(0)
    store = RequestStore()
    store.set_columns(COLUMNS)
    analyzer = Analyzer(decoder)
    tok = decoder.tokenizer
    prompt = tok.encode("Tell me about France.").ids
    answer = tok.encode(PARAGRAPH * (n_tokens // 20 + 1)).ids[:n_tokens]
    req, n_prompt = "cmpl-bench-0-1a2b3c4d", len(prompt)
    store.ingest(*_step(0, req, 0, prompt, n_prompt, [answer[0]], rng), COLUMNS)
    cpu = 0.0
    for g in range(1, len(answer)):
        store.ingest(*_step(g, req, n_prompt + g - 1, [answer[g - 1]], n_prompt, [answer[g]],
                            rng), COLUMNS)
        t0 = time.thread_time()
        if incremental:
            analyzer.current(store, req, stream=True)
            analyzer.current(store, req)
        else:
            snap = store.snapshot(req)
            assert snap is not None
            analyzer.analyse(*snap, store.columns, settled_only=True)
            snap = store.snapshot(req)
            assert snap is not None
            analyzer.analyse(*snap, store.columns)
        cpu += time.thread_time() - t0
    updates = len(answer) - 1
    return {"updates": updates, "cpu_total_s": cpu, "cpu_per_update_us": 1e6 * cpu / updates}


def main(argv: list[str] | None = None) -> None:
    from detector.models.embedded import ensure_embedded_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32,256,1024,2048",
                        type=lambda v: [int(x) for x in v.split(",")])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    decoder = TextDecoder.from_model_dir(ensure_embedded_model(progress=False))
    assert decoder is not None
    results: dict[str, Any] = {}
    for n in args.lengths:
        results[str(n)] = {kind: measure(decoder, n, kind == "incremental")
                           for kind in ("scratch", "incremental")}
        r = results[str(n)]
        logger.info("%5d tokens: per update %8.0f us scratch, %6.0f us incremental "
                    "(total %.2f s vs %.3f s)", n, r["scratch"]["cpu_per_update_us"],
                    r["incremental"]["cpu_per_update_us"], r["scratch"]["cpu_total_s"],
                    r["incremental"]["cpu_total_s"])
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
