"""Per-row probabilities -> per-token scores: which row scores which token, and when.

A row at position p is the residual stream after the model read token p. A generated token
at position q can be scored from the row that produced it (q-1, available in the same step
as the token) or from its own row (q, available one step later; never for the final token,
which vLLM does not feed back). Each probe says which it uses (``score_position``); the
store keeps per-row probabilities and :func:`token_scores` resolves them per token when
read, so a row that arrives late (``own``) or is scored again (a recompute) needs no fix-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from detector.channel.wire import StepHeader
from detector.verdict import VerdictModel


@dataclass(slots=True)
class ProbeColumns:
    """The probes a row was scored with (shared by every row scored together)."""

    names: tuple[str, ...]
    score_positions: tuple[str, ...]
    thresholds: tuple[float, ...]  # on each token's probability
    aggregations: tuple[str, ...] = ()
    # Per probe: its claim verdict (detector.verdict) and the threshold chosen on it for
    # the operator's target false-flag rate; None for a probe judged by its own scores.
    verdicts: tuple[tuple[VerdictModel, float] | None, ...] = ()

    @property
    def claim_thresholds(self) -> tuple[float, ...]:
        """Per probe, the threshold its claims are judged with (the verdict's if any)."""
        verdicts = self.verdicts or (None,) * len(self.names)
        return tuple(v[1] if v is not None else t for v, t in zip(verdicts, self.thresholds))

    def index(self, name: str) -> int | None:
        try:
            return self.names.index(name)
        except ValueError:
            return None


@dataclass(slots=True)
class TokenScore:
    position: int
    token_id: int
    # probe name -> calibrated probability; a probe missing here could not score the token.
    scores: dict[str, float]
    # Every row the active probes read for this token has arrived: its scores are final.
    settled: bool = False
    generated_ns: int = 0
    # probe name -> whether the row it was scored from lies outside the probe's training
    # summary (detector.drift); only probes that ship one, only rows that were scored.
    outside: dict[str, bool] = field(default_factory=dict)


def token_scores(generated: Sequence[int], generated_ns: Sequence[int], num_prompt_tokens: int,
                 rows: Mapping[int, tuple[ProbeColumns, np.ndarray]],
                 columns: ProbeColumns | None, start: int = 0) -> list[TokenScore]:
    """Every generated token from ``start`` on, in order, with whatever scores its rows have."""
    out = []
    for g in range(start, len(generated)):
        token = generated[g]
        q = num_prompt_tokens + g
        scores: dict[str, float] = {}
        outside: dict[str, bool] = {}
        settled = True
        if columns is not None:
            for name, where in zip(columns.names, columns.score_positions):
                row = rows.get(q - 1 if where == "producer" else q)
                if row is None:
                    settled = False
                    continue
                i = row[0].index(name)
                if i is not None:
                    value = float(row[1][i])
                    # NaN: a hybrid probe lacked token features. Nothing but a
                    # probability in [0, 1] ever leaves the API.
                    if 0.0 <= value <= 1.0:
                        scores[name] = value
                        # A row scored with drift carries, after the probabilities,
                        # one outside flag per probe (NaN: the probe has no summary).
                        flag = (float(row[1][len(row[0].names) + i])
                                if len(row[1]) > len(row[0].names) else math.nan)
                        if not math.isnan(flag):
                            outside[name] = flag > 0.5
        when = generated_ns[g] if g < len(generated_ns) else 0
        out.append(TokenScore(position=q, token_id=token, scores=scores, settled=settled,
                              generated_ns=when, outside=outside))
    return out


def rows_to_score(header: StepHeader) -> np.ndarray:
    """Global row indices worth scoring: the last prompt row and every generated row.

    Prompt rows before the last one never score a generated token, so they are skipped
    before the matrix product rather than after it.
    """
    keep: list[np.ndarray] = []
    for req in header.requests:
        start = max(req.num_prompt_tokens - 1 - req.first_position, 0)
        if start < req.num_rows:
            keep.append(np.arange(req.row_offset + start, req.row_offset + req.num_rows))
    return np.concatenate(keep) if keep else np.empty(0, dtype=np.int64)


def columns_for(names: Sequence[str], score_positions: Sequence[str],
                thresholds: Sequence[float], aggregations: Sequence[str] | None = None,
                verdicts: Sequence[tuple[VerdictModel, float] | None] | None = None
                ) -> ProbeColumns:
    return ProbeColumns(tuple(names), tuple(score_positions), tuple(float(t) for t in thresholds),
                        tuple(aggregations) if aggregations is not None else ("max",) * len(names),
                        tuple(verdicts) if verdicts is not None else (None,) * len(names))


__all__ = ["ProbeColumns", "TokenScore", "columns_for", "rows_to_score", "token_scores"]
