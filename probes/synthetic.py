"""A synthetic capture with a known answer, for tests and for trying the pipeline offline.

Rows are Gaussian noise with per-feature offsets and scales (like a residual stream's);
only ``signal_layer`` carries the label, along one fixed direction, and only in the rows
that ``signal_position`` reads, so a correct trainer must pick exactly that layer and row.
Log-probabilities are weakly informative, so the baselines sit between chance and the probe.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detector.model_identity import ModelIdentity
from probes.spans import ScorePosition
from probes.store import CaptureManifest, CaptureRecord, CaptureStore, SpanEntry

SYNTHETIC_MODEL = ModelIdentity(name="synthetic", fingerprint="5e5e5e5e5e5e5e5e",
                                hidden_size=16, num_layers=8)


def make_synthetic_capture(
    directory: str | Path,
    *,
    layers: tuple[int, ...] = (2, 4, 6),
    signal_layer: int = 4,
    signal_position: ScorePosition = "own",
    n_entities: int = 120,
    domains: tuple[str, ...] = ("alpha", "beta", "gamma"),
    strength: float = 1.5,
    seed: int = 0,
    shard_rows: int = 256,
) -> Path:
    rng = np.random.default_rng(seed)
    h = SYNTHETIC_MODEL.hidden_size
    direction = rng.normal(size=h)
    direction /= np.linalg.norm(direction)
    offsets = rng.normal(scale=3.0, size=(len(layers), h))
    scales = rng.uniform(0.5, 3.0, size=(len(layers), h))
    li = layers.index(signal_layer)
    manifest = CaptureManifest(
        model=SYNTHETIC_MODEL, model_dir="<synthetic>", layers=list(layers), hidden_size=h,
        served_dtype="float32", source="questions", dataset_hash=f"synthetic-{seed}",
    )
    store = CaptureStore.create_or_resume(directory, manifest, shard_rows=shard_rows)
    for e in range(n_entities):
        domain = domains[e % len(domains)]
        invented = e % 10 == 0
        for style in ("plain", "chat"):
            y = 1 if invented or rng.random() < 0.5 else 0
            label = "fabrication" if y else "retrieval"
            k = int(rng.integers(1, 4))
            rows = rng.normal(size=(k + 1, len(layers), h))
            # own rows of the span's tokens are 1..k; producer rows are 0..k-1
            carry = range(1, k + 1) if signal_position == "own" else range(0, k)
            for r in carry:
                rows[r, li] += (1.0 if y else -1.0) * strength * direction
            rows = rows * scales + offsets
            lp = -np.abs(rng.normal(loc=1.0 if y else 0.6, scale=0.7, size=k))
            ent = np.abs(rng.normal(loc=1.2 if y else 1.0, scale=0.5, size=k))
            span = SpanEntry(label=label, reason="synthetic", chars=(0, 4), text=f"ans{e}",
                             tokens=(0, k), token_ids=list(range(k)), logprobs=lp.tolist(),
                             entropies=ent.tolist())
            record = CaptureRecord(
                id=f"q{e}|{style}", source="questions", question_id=f"q{e}",
                topic=f"{domain}_topic", domain=domain, group=f"entity:{e}",
                subject=f"E{e}", invented=invented, style=style, question=f"question {e}?",
                completion=f" ans{e}", num_prompt_tokens=10, num_generated=k + 1,
            )
            record.spans = [span]
            store.append(record, [rows.astype(np.float16)])
    store.close()
    return Path(directory)


__all__ = ["SYNTHETIC_MODEL", "make_synthetic_capture"]
