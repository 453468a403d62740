"""Token features for hybrid probes: what a step carries, and what a scored row reads.

Hybrid probes also read each generated token's features (log-probability, entropy,
:mod:`detector.engine.token_features`), which arrive with the token
(``RequestRows.sampled_logprobs``/``sampled_entropies``); the store keeps them per token
(``RequestRecord.features``) so a row scored in a later step (``own``, or a recomputed row)
finds the features of the token it scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from detector.channel.wire import RequestRows, StepHeader
from detector.sidecar.records import RequestRecord


def sampled_features(req: RequestRows) -> dict[str, list[float]]:
    """The token features a request's step carries, by feature name."""
    out = {}
    if req.sampled_logprobs is not None:
        out["logprob"] = req.sampled_logprobs
    if req.sampled_entropies is not None:
        out["entropy"] = req.sampled_entropies
    return out


def token_feature_inputs(
    records: Mapping[str, RequestRecord], header: StepHeader, positions_scored: np.ndarray,
    names: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Token features for the rows of ``header`` about to be scored, before the step is
    ingested: ``(own, producer)``, each ``(len(positions_scored), len(names))`` float32.

    Row p scores token p as its own row and token p+1 as its producer. A token's
    features come from this step (tokens it sampled) or from ``records`` (tokens sampled
    earlier); NaN where neither has them (a hook without features, a dropped step)."""
    n = len(positions_scored)
    own = np.full((n, len(names)), np.nan, dtype=np.float32)
    producer = np.full((n, len(names)), np.nan, dtype=np.float32)
    if not n or not names:
        return own, producer
    i = 0
    for req in header.requests:
        hi = req.row_offset + req.num_rows
        if i >= n or positions_scored[i] >= hi:
            continue
        rec = records.get(req.req_id)
        stored = rec.features if rec is not None else {}
        fresh = sampled_features(req)
        end = req.first_position + req.num_rows
        p0 = req.num_prompt_tokens

        def value(name: str, pos: int) -> float:
            new = fresh.get(name)
            if new is not None and 0 <= pos - end < len(new):
                return new[pos - end]
            old = stored.get(name)
            g = pos - p0
            return old[g] if old is not None and 0 <= g < len(old) else float("nan")

        while i < n and positions_scored[i] < hi:
            pos = req.first_position + int(positions_scored[i]) - req.row_offset
            for f, name in enumerate(names):
                own[i, f] = value(name, pos)
                producer[i, f] = value(name, pos + 1)
            i += 1
    return own, producer


__all__ = ["sampled_features", "token_feature_inputs"]
