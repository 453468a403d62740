"""Labelled spans of a capture as arrays: what training and evaluation read.

Each span is one labelled claim (1 = fabrication, 0 = retrieval): for generated answers
the claim span (``detector.claims``) that carries the labelled answer. Its tokens are laid
out consecutively, so per-token scores reduce to per-span scores with
:func:`detector.claims.aggregate_segments` (the sidecar's aggregation); each token knows
its producer row (position q-1) and its own row (position q).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from detector.claims import aggregate_segments
from probes.store import CaptureStore

logger = logging.getLogger(__name__)

ScorePosition = Literal["producer", "own"]
SCORE_POSITIONS: tuple[ScorePosition, ...] = ("producer", "own")


@dataclass
class SpanTable:
    layers: list[int]
    rows: np.ndarray  # (n_rows, L, H) float16
    # per span
    ids: np.ndarray
    y: np.ndarray  # 1 = fabrication
    groups: np.ndarray
    topics: np.ndarray
    domains: np.ndarray
    invented: np.ndarray
    styles: np.ndarray
    texts: np.ndarray
    questions: np.ndarray
    token_start: np.ndarray  # first token index of each span
    token_count: np.ndarray
    # per token
    token_span: np.ndarray
    producer_row: np.ndarray
    own_row: np.ndarray
    logprobs: np.ndarray  # of the generated token (nan if unknown)
    entropies: np.ndarray
    # Hybrid probes: token features appended to ``features()`` (probes.hybrid).
    token_features: list[str] = field(default_factory=list)

    @property
    def n_spans(self) -> int:
        return int(self.y.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.rows.shape[2])

    def token_index(self, spans: np.ndarray) -> np.ndarray:
        """Token indices of the given spans, in span order."""
        spans = np.asarray(spans, dtype=np.int64)
        if not spans.size:
            return np.zeros(0, np.int64)
        starts, counts = self.token_start[spans], self.token_count[spans]
        return np.concatenate([np.arange(a, a + k) for a, k in zip(starts, counts)])

    def features(self, spans: np.ndarray, layers: Sequence[int], position: ScorePosition
                 ) -> np.ndarray:
        """(n_tokens, len(layers) * H) float32: the rows a probe reads for these spans' tokens
        (then ``token_features`` columns, for a hybrid probe)."""
        tokens = self.token_index(spans)
        rows = self.producer_row if position == "producer" else self.own_row
        li = [self.layers.index(k) for k in layers]
        x = self.rows[rows[tokens]][:, li, :]
        x = x.reshape(len(tokens), -1).astype(np.float32)
        if self.token_features:
            from probes.hybrid import token_feature_matrix

            x = np.concatenate([x, token_feature_matrix(self, tokens, self.token_features)], 1)
        return x

    def token_labels(self, spans: np.ndarray) -> np.ndarray:
        spans = np.asarray(spans, dtype=np.int64)
        return np.repeat(self.y[spans], self.token_count[spans])

    def token_weights(self, spans: np.ndarray) -> np.ndarray:
        """Per-token weights that make every span count once (1/len), with mean 1."""
        spans = np.asarray(spans, dtype=np.int64)
        counts = self.token_count[spans].astype(np.float64)
        w = np.repeat(1.0 / counts, self.token_count[spans])
        return w * (w.size / w.sum()) if w.size else w

    def span_scores(self, spans: np.ndarray, token_scores: np.ndarray, how: str = "max"
                    ) -> np.ndarray:
        """Per-span scores from the per-token scores of ``spans``' tokens (in span order),
        aggregated by :func:`detector.claims.aggregate_segments`: the function the sidecar
        judges claims with, so trained, evaluated and served aggregation are one."""
        spans = np.asarray(spans, dtype=np.int64)
        return aggregate_segments(np.asarray(token_scores), self.token_count[spans], how)

    def span_max(self, spans: np.ndarray, token_scores: np.ndarray) -> np.ndarray:
        """Max of per-token scores within each span (the sidecar's default aggregation)."""
        return self.span_scores(spans, token_scores, "max")

    def subset_mask(self, *, invented: bool | None = None) -> np.ndarray:
        mask = np.ones(self.n_spans, dtype=bool)
        if invented is not None:
            mask &= self.invented == invented
        return mask


def neg_min_logprob(table: SpanTable, spans: np.ndarray) -> np.ndarray:
    """Per span, minus the lowest finite log-probability of its tokens (NaN if none): the
    verdict's ``neg_min_logprob`` signal, as :func:`detector.verdict.claim_signals` serves it."""
    spans = np.asarray(spans, dtype=np.int64)
    lp = np.asarray(table.logprobs, dtype=np.float64)[table.token_index(spans)]
    worst = table.span_scores(spans, np.where(np.isfinite(lp), -lp, -np.inf), "max")
    return np.where(np.isfinite(worst), worst, np.nan)


def load_span_table(store: CaptureStore) -> SpanTable:
    """Every retrieval/fabrication span that has rows, as a :class:`SpanTable`."""
    blocks: list[np.ndarray] = []
    per_span: dict[str, list] = {k: [] for k in (
        "ids", "y", "groups", "topics", "domains", "invented", "styles", "texts", "questions",
        "token_start", "token_count")}
    tok: dict[str, list] = {k: [] for k in ("token_span", "producer_row", "own_row",
                                           "logprobs", "entropies")}
    n_rows = n_tokens = 0
    for record in sorted(store.records(), key=lambda r: r.id):
        for si, span in enumerate(record.spans):
            if span.label not in ("retrieval", "fabrication") or not span.has_rows:
                continue
            rows = store.span_rows(record, span)
            k = span.num_rows - 1  # tokens in the span
            if k <= 0:
                continue
            span_index = len(per_span["ids"])
            per_span["ids"].append(f"{record.id}#{si}")
            per_span["y"].append(1 if span.label == "fabrication" else 0)
            per_span["groups"].append(record.group)
            per_span["topics"].append(record.topic)
            per_span["domains"].append(record.domain)
            per_span["invented"].append(record.invented)
            per_span["styles"].append(record.style)
            per_span["texts"].append(span.text)
            per_span["questions"].append(record.question)
            per_span["token_start"].append(n_tokens)
            per_span["token_count"].append(k)
            blocks.append(rows)
            tok["token_span"] += [span_index] * k
            tok["producer_row"] += list(range(n_rows, n_rows + k))
            tok["own_row"] += list(range(n_rows + 1, n_rows + k + 1))
            lps = list(span.logprobs) + [float("nan")] * (k - len(span.logprobs))
            ents = list(span.entropies) + [float("nan")] * (k - len(span.entropies))
            tok["logprobs"] += lps[:k]
            tok["entropies"] += ents[:k]
            n_rows += span.num_rows
            n_tokens += k
    if not blocks:
        raise ValueError(f"{store.directory}: no labelled spans with rows to train on")
    rows = np.concatenate(blocks, axis=0)
    if not np.isfinite(rows).all():
        bad = int((~np.isfinite(rows)).sum())
        logger.warning("%d non-finite values in the stored rows (float16 overflow?); set to 0", bad)
        rows = np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)
    table = SpanTable(
        layers=list(store.manifest.layers),
        rows=rows,
        **{k: np.asarray(v) for k, v in per_span.items()},
        **{k: np.asarray(v, dtype=np.float64 if k in ("logprobs", "entropies") else np.int64)
           for k, v in tok.items()},
    )
    logger.info("loaded %d spans (%d fabrication, %d retrieval), %d tokens, %d rows of %d layers",
                table.n_spans, int(table.y.sum()), int((1 - table.y).sum()), n_tokens, n_rows,
                len(table.layers))
    return table


__all__ = ["SCORE_POSITIONS", "ScorePosition", "SpanTable", "load_span_table"]
