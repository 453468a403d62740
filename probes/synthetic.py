"""Synthetic data with a known answer, for tests and for trying the pipeline offline.

:func:`make_synthetic_capture`: rows are Gaussian noise with per-feature offsets and scales
(like a residual stream's); only ``signal_layer`` carries the label, along one fixed
direction, and only in the rows that ``signal_position`` reads, so a correct trainer must
pick exactly that layer and row. Log-probabilities are weakly informative, so the baselines
sit between chance and the probe.

:func:`make_topic_leak_table`: the trap a fabrication probe falls into on real data. One
layer knows only the topic, and topics differ in their base rate of fabrication, so that
layer predicts the label across topics and says nothing within one; another layer carries
a weaker signal that holds within every topic. Selection by entity-grouped CV picks the
topic layer; a trainer that cannot learn the topic picks the other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from detector.model_identity import ModelIdentity
from probes.spans import ScorePosition, SpanTable
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


# (topic, domain, base rate of fabrication); the invented template counts in element_discoverer
LEAK_TOPICS: tuple[tuple[str, str, float], ...] = (
    ("country_capital", "geography", 0.15), ("country_currency", "geography", 0.85),
    ("country_language", "geography", 0.15), ("city_country", "geography", 0.85),
    ("element_symbol", "chemistry", 0.15), ("element_discoverer", "chemistry", 0.85),
    ("state_capital", "us_states", 0.15), ("state_statehood", "us_states", 0.85),
)


def make_topic_leak_table(*, n_per_topic: int = 60, n_invented: int = 20,
                          topic_layer: int = 2, signal_layer: int = 4,
                          topic_strength: float = 4.0, signal_strength: float = 0.5,
                          seed: int = 0) -> SpanTable:
    """An in-memory :class:`SpanTable` whose ``topic_layer`` rows encode only the topic
    (whose base rate predicts the label) and whose ``signal_layer`` rows carry a weaker
    label signal that holds within every topic (both rows of every token).

    ``n_invented`` spans of ``invented_element_discoverer`` (all fabrications) are added;
    they share ``element_discoverer``'s topic vector. Hidden size 16, one span per entity,
    1-3 tokens per span."""
    rng = np.random.default_rng(seed)
    h = SYNTHETIC_MODEL.hidden_size
    layers = [topic_layer, signal_layer]
    direction = rng.normal(size=h)
    direction /= np.linalg.norm(direction)
    topic_vec = {t: rng.normal(size=h) * topic_strength / np.sqrt(h) * 2
                 for t, _, _ in LEAK_TOPICS}
    specs = [(t, d, rate, False, n_per_topic) for t, d, rate in LEAK_TOPICS]
    specs.append(("invented_element_discoverer", "chemistry", 1.0, True, n_invented))
    per: dict[str, list] = {k: [] for k in ("ids", "y", "groups", "topics", "domains",
                                           "invented", "styles", "texts", "questions",
                                           "token_start", "token_count")}
    blocks, n_rows, n_tokens, token_span = [], 0, 0, []
    producer, own = [], []
    for topic, domain, rate, invented, n in specs:
        vec = topic_vec["element_discoverer" if invented else topic]
        for e in range(n):
            y = 1 if invented or rng.random() < rate else 0
            k = int(rng.integers(1, 4))
            rows = rng.normal(size=(k + 1, 2, h))
            rows[:, 0] += vec
            rows[:, 1] += (1.0 if y else -1.0) * signal_strength * direction
            blocks.append(rows)
            span = len(per["ids"])
            for key, value in (("ids", f"{topic}:{e}"), ("y", y), ("groups", f"{topic}:e{e}"),
                               ("topics", topic), ("domains", domain), ("invented", invented),
                               ("styles", "plain"), ("texts", f"ans{e}"),
                               ("questions", f"{topic} {e}?"), ("token_start", n_tokens),
                               ("token_count", k)):
                per[key].append(value)
            token_span += [span] * k
            producer += list(range(n_rows, n_rows + k))
            own += list(range(n_rows + 1, n_rows + k + 1))
            n_rows += k + 1
            n_tokens += k
    lp = -np.abs(rng.normal(loc=1.0, scale=0.7, size=n_tokens))
    return SpanTable(
        layers=layers, rows=np.concatenate(blocks).astype(np.float16),
        **{k: np.asarray(v) for k, v in per.items()},
        token_span=np.asarray(token_span, dtype=np.int64),
        producer_row=np.asarray(producer, dtype=np.int64),
        own_row=np.asarray(own, dtype=np.int64), logprobs=lp,
        entropies=np.abs(rng.normal(size=n_tokens)),
    )


__all__ = ["LEAK_TOPICS", "SYNTHETIC_MODEL", "make_synthetic_capture", "make_topic_leak_table"]
