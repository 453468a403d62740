"""Hybrid probes in training: the token features beside the residual-stream rows.

A hybrid probe reads, after its layers' rows, the scored token's features (its
log-probability and the entropy of its top-20 distribution; ``detector.engine.token_features``
defines them and computes them in the engine). Training reads the same quantities from
the OpenAI API's ``logprobs=20`` (``SpanTable.logprobs``/``entropies``, captured by
``probes.capture``), so the columns appended here are what the served probe receives.

The token whose features a row gets is the token the row scores, whatever the score
position (producer row q-1 or own row q both score token q), as the sidecar does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

from detector.engine.token_features import TOKEN_FEATURES

logger = logging.getLogger(__name__)

_SOURCE = {"logprob": "logprobs", "entropy": "entropies"}


def token_feature_matrix(table: object, tokens: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """``(len(tokens), len(names))`` float32 token features of a SpanTable's tokens.

    A token whose feature is unknown (the API returned none for it) gets the mean of the
    known values of that feature over ``tokens``, so a fit can use the rest of its span;
    served, such a token is left unscored instead (counted and logged here)."""
    names = _checked(names)
    out = np.empty((len(tokens), len(names)), dtype=np.float32)
    for f, name in enumerate(names):
        values = np.asarray(getattr(table, _SOURCE[name]), dtype=np.float64)[tokens]
        unknown = ~np.isfinite(values)
        if unknown.any():
            fill = float(values[~unknown].mean()) if (~unknown).any() else 0.0
            logger.warning("%d of %d tokens have no %s; filled with the mean %.4f",
                           int(unknown.sum()), len(tokens), name, fill)
            values = np.where(unknown, fill, values)
        out[:, f] = values
    return out


def with_token_features(table: object, names: Sequence[str]):  # noqa: ANN201 - a SpanTable
    """A shallow copy of a SpanTable whose ``features()`` appends ``names``' columns."""
    return dataclasses.replace(table, token_features=_checked(names))


def _checked(names: Sequence[str]) -> list[str]:
    """The names in the order given (the artifact's column order), known and unique."""
    names = list(names)
    unknown = [n for n in names if n not in TOKEN_FEATURES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"token features must be unique names from {list(TOKEN_FEATURES)}, "
                         f"got {names}")
    return names


__all__ = ["token_feature_matrix", "with_token_features"]
