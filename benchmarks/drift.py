"""What the drift signal (``detector.drift``) costs the sidecar and what it sees.

1. **Cost, in process** (seconds): the fused scorer's step (logits and probabilities) on 16
   rows of the test server's captured layers, with and without a summary on each probe, for
   1 and 4 probes. Rounds alternate the two so machine noise hits both; medians reported.
2. **Rows, on a capture** (``--capture DIR``, a ``lie-detector capture`` store): the summary
   fitted on the training rows of all but one domain (or style), and the fraction of rows
   outside on held-out questions of the trained domains and on the domain left out.
3. **Served** (``--served``, with ``--capture``): one vLLM server (the test helper) and a
   channel tap; answers to QA, chat, prose, code, other-language and junk prompts, each
   answer's fraction of generated rows outside and whether it is out of distribution.

Run from the repository root::

    .venv/bin/python -m benchmarks.drift
    .venv/bin/python -m benchmarks.drift --capture /path/to/capture --layers 16,20 --served

Figures are printed and written to ``benchmarks/results/drift.json``; nothing here
asserts a value.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.artifact import ProbeArtifact, ProbeMetadata
from detector.drift import OOD_RESPONSE_FRACTION, drift_statistics, outside
from detector.model_identity import ModelIdentity
from detector.sidecar.scorer import FusedProbeScorer
from probes.drift_fit import FittedDrift, fit_drift, fit_table_drift, with_drift

logger = logging.getLogger(__name__)

H, CAPTURED = 576, [8, 15, 16, 20, 22]  # SmolLM2's hidden size, the test server's layers
MODEL = ModelIdentity(name="bench", fingerprint="00ff00ff00ff00ff", hidden_size=H,
                      num_layers=30)
PROMPTS = {
    "qa-capital": "Q: What is the capital of Peru?\nA:",
    "qa-element": "Q: What is the chemical symbol of silver?\nA:",
    "qa-author": "Q: Who wrote the novel Moby-Dick?\nA:",
    "qa-year": "Q: In which year did the Berlin Wall fall?\nA:",
    "chat-capital": "<|im_start|>user\nWhat is the capital of Kenya?<|im_end|>\n"
                    "<|im_start|>assistant\n",
    "chat-long": "<|im_start|>user\nTell me about the history of Rome in three sentences."
                 "<|im_end|>\n<|im_start|>assistant\n",
    "prose": "Write a short story about a lighthouse keeper:\n",
    "code": "def quicksort(items):\n",
    "french": "Quelle est la capitale du Pérou ? Réponds en français :",
    "chinese": "请用中文介绍一下长城的历史：",
    "junk": "zq#@ 93kd;; ]]x~ 0x7f4e ++ qqqq lorem zzkt vv// ## 77 ^^ pw",
}


def _probe(name: str, layers: list[int], summary: bool, seed: int) -> ProbeArtifact:
    g = torch.Generator().manual_seed(seed)
    meta = ProbeMetadata(name=name, model=MODEL, layers=layers, hidden_size=H,
                         score_position="producer", calibration="none", threshold=0.5)
    art = ProbeArtifact(metadata=meta, weight=torch.randn(len(layers) * H, generator=g) * 0.01,
                        bias=torch.zeros(1))
    if not summary:
        return art
    x = np.random.default_rng(seed).normal(size=(2000, len(layers) * H)).astype(np.float32)
    return with_drift(art, fit_drift(x))


def cost(rounds: int, reps: int) -> dict[str, Any]:
    """Median microseconds per 16-row step, with and without summaries."""
    rows = torch.randn(len(CAPTURED), 16, H, dtype=torch.bfloat16)
    out: dict[str, Any] = {}
    for n in (1, 4):
        layer_sets = [[16, 20], [15], [22], [8, 16]][:n]
        scorers = {kind: FusedProbeScorer(
            [_probe(f"p{i}", ls, kind == "drift", i) for i, ls in enumerate(layer_sets)],
            captured_layers=CAPTURED, hidden_size=H, device="cpu") for kind in ("plain", "drift")}
        times: dict[str, list[float]] = {"plain": [], "drift": []}
        for _ in range(rounds):
            for kind, s in scorers.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    logits, _ = s.logits_and_drift(rows)
                    s.probabilities(logits)
                times[kind].append((time.perf_counter() - t0) / reps * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[f"{n}-probes"] = {"plain_us": round(med["plain"], 1),
                              "drift_us": round(med["drift"], 1),
                              "added_us": round(med["drift"] - med["plain"], 1)}
        logger.info("%d probe(s): %s", n, out[f"{n}-probes"])
    return out


def _rate(fitted: FittedDrift, x: np.ndarray) -> float:
    s = fitted.summary
    return round(float(outside(*drift_statistics(x, fitted.mean, fitted.directions,
                                                 s.component_std), s).mean()), 4)


def on_capture(capture: Path, layers: list[int], seed: int = 0) -> tuple[dict, FittedDrift]:
    """Leave-one-domain-out and leave-one-style-out outside rates on a capture's rows."""
    from probes.spans import load_span_table
    from probes.store import CaptureStore

    t = load_span_table(CaptureStore.open(capture))
    li = [t.layers.index(k) for k in layers]

    def rows_of(spans: np.ndarray) -> np.ndarray:
        tok = t.token_index(spans)
        r = np.unique(np.concatenate([t.producer_row[tok], t.own_row[tok]]))
        return t.rows[r][:, li, :].reshape(len(r), -1).astype(np.float32)

    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"domains": {}, "styles": {}}
    for held in np.unique(t.domains):
        trained = t.domains != held
        groups = np.unique(t.groups[trained])
        test_groups = rng.permutation(groups)[: len(groups) // 4]
        test = trained & np.isin(t.groups, test_groups)
        fitted = fit_table_drift(t, np.where(trained & ~test)[0], layers, seed=seed)
        assert fitted is not None
        out["domains"][str(held)] = {
            "heldout_questions_trained_domains": _rate(fitted, rows_of(np.where(test)[0])),
            "left_out_domain": _rate(fitted, rows_of(np.where(~trained)[0]))}
    for held in np.unique(t.styles):
        fitted = fit_table_drift(t, np.where(t.styles != held)[0], layers, seed=seed)
        assert fitted is not None
        out["styles"][str(held)] = {"left_out_style": _rate(fitted, rows_of(
            np.where(t.styles == held)[0]))}
    full = fit_table_drift(t, np.arange(t.n_spans), layers, seed=seed)
    assert full is not None
    return out, full


def served(fitted: FittedDrift, layers: list[int], max_tokens: int) -> dict[str, Any]:
    """Answers of one vLLM server (float32, the test helper's) against the summary."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import ChannelTap, complete_many, start_vllm  # test helpers: one server

    from detector.models.embedded import ensure_embedded_model

    model_dir = ensure_embedded_model(progress=False)
    server = start_vllm(model_dir, Path(tempfile.mkdtemp(prefix="ld-drift-")), layers=layers,
                        enforce_eager=True)
    try:
        tap = ChannelTap(server.channel)
        try:
            tap.wait_connected(server.base_url)
            jobs = [{"prompt": p, "max_tokens": max_tokens, "request_id": k}
                    for k, p in PROMPTS.items()]
            replies = complete_many(server.base_url, jobs)
            time.sleep(1.5)
        finally:
            tap.close()
    finally:
        server.stop()
    out = {}
    for (name, _), reply in zip(PROMPTS.items(), replies):
        _, cap = tap.find(f"cmpl-{name}-0")
        p0 = cap.num_prompt_tokens
        positions = sorted(q for q in cap.rows if q >= p0 - 1)  # the rows that score tokens
        x = np.stack([cap.rows[q].numpy().reshape(-1) for q in positions]).astype(np.float32)
        frac = _rate(fitted, x)
        out[name] = {"rows": len(positions), "outside_fraction": frac,
                     "out_of_distribution": frac > OOD_RESPONSE_FRACTION,
                     "text": reply["choices"][0]["text"][:60]}
        logger.info("%-13s %s", name, out[name])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--capture", type=Path, help="a capture store to measure rows on")
    p.add_argument("--layers", default="16,20", help="the probe's layers (default 16,20)")
    p.add_argument("--served", action="store_true", help="also one vLLM server (--capture)")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # steadier on a shared box, like the sidecar's default
    if args.served and args.capture is None:
        p.error("--served needs --capture (the summary is fitted on it)")
    result: dict[str, Any] = {"benchmark": "drift", "cost_per_16_row_step": cost(args.rounds,
                                                                                 args.reps)}
    if args.capture is not None:
        layers = [int(k) for k in args.layers.split(",")]
        result["capture"], fitted = on_capture(args.capture, layers)
        result["capture"]["layers"] = layers
        if args.served:
            result["served"] = served(fitted, layers, args.max_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "drift.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))  # noqa: T201 - the report
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
