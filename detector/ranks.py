"""Mid-ranks against a reference sample: the scale the verdict fuses its signals on.

One formula for serving (:meth:`detector.verdict.VerdictModel.ranks`, against the sample
a probe shipped with) and fitting (``probes.verdict_fit``, against the training sample
itself), so a signal is ranked the same way where the weights are chosen and where they
are applied.
"""

from __future__ import annotations

import numpy as np


def midranks(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each value's mid-rank in the sorted ``reference``, in [0, 1]: the share of it below
    the value plus half the share equal to it. Non-finite values get NaN."""
    v = np.asarray(values, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    out = np.full(v.shape, np.nan)
    ok = np.isfinite(v)
    lo = np.searchsorted(r, v[ok], side="left")
    hi = np.searchsorted(r, v[ok], side="right")
    out[ok] = (lo + hi) / (2.0 * len(r))
    return out


__all__ = ["midranks"]
