"""Per-token features a hybrid probe reads beside the residual stream: one definition.

The engine hook computes these from a step's logits, and training reads the same
quantities from the OpenAI API (``logprobs=20``). Both must agree exactly or the probe
sees different inputs when served than when trained (train/serve skew), so the math lives
here, in plain torch, imported by the hook and the tests; nothing here imports vLLM.

* ``logprob``: log-probability of the token being scored under the model's *unprocessed*
  distribution (``log_softmax`` of the raw logits, before temperature, penalties or
  top-p). vLLM's default ``logprobs_mode`` is ``raw_logprobs``, which is what the API
  returns as ``token_logprobs``.
* ``entropy``: entropy (nats) of the top-``TOP_K`` alternatives at that position,
  renormalised to sum to one: :func:`topk_entropy`, which :func:`entropy_of` also applies
  to the API's ``top_logprobs`` for training and the held-out baselines. A lower bound on
  the full entropy, kept because training only ever sees the top 20.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, get_args

import torch

TokenFeature = Literal["logprob", "entropy"]
# Canonical order: the order of feature columns wherever several are stacked.
TOKEN_FEATURES: tuple[str, ...] = get_args(TokenFeature)
TOP_K = 20
TOKEN_FEATURES_ENV = "LIE_DETECTOR_TOKEN_FEATURES"


def parse_token_features(value: str | Sequence[str] | None) -> list[str]:
    """``"entropy,logprob"`` -> ``["logprob", "entropy"]`` (canonical order, unique);
    unknown names raise ``ValueError`` naming the known ones."""
    if value is None:
        return []
    parts = value.replace(" ", ",").split(",") if isinstance(value, str) else list(value)
    names = {p.strip() for p in parts if p and p.strip()}
    unknown = sorted(names - set(TOKEN_FEATURES))
    if unknown:
        raise ValueError(f"unknown token feature(s) {unknown}; known: {list(TOKEN_FEATURES)}")
    return [f for f in TOKEN_FEATURES if f in names]


def token_features(
    logits: torch.Tensor, token_ids: torch.Tensor, names: Sequence[str], *, top_k: int = TOP_K
) -> torch.Tensor:
    """``(n, vocab)`` raw logits and the ``(n,)`` tokens they chose -> ``(n, len(names))``
    float32 features, columns in ``names`` order (what the publisher's thread computes for
    the hook, ``vllm_adapter._deferred_features``)."""
    if logits.dim() != 2 or token_ids.shape != (logits.shape[0],):
        raise ValueError(f"logits (n, vocab) and token_ids (n,) expected, got "
                         f"{tuple(logits.shape)} and {tuple(token_ids.shape)}")
    x = logits.to(torch.float32)
    cols: list[torch.Tensor] = []
    for name in names:  # only what is asked: the top-k costs far more than the normaliser
        if name == "logprob":
            token_logits = x.gather(1, token_ids.long().view(-1, 1)).squeeze(1)
            cols.append(token_logits - torch.logsumexp(x, dim=-1))
        elif name == "entropy":
            cols.append(topk_entropy(x.topk(min(top_k, x.shape[-1]), dim=-1).values, top_k))
        else:
            raise ValueError(f"unknown token feature {name!r}; known: {list(TOKEN_FEATURES)}")
    if not cols:
        return torch.empty((x.shape[0], 0), dtype=torch.float32, device=x.device)
    return torch.stack(cols, dim=1)


def topk_entropy(scores: torch.Tensor, top_k: int = TOP_K) -> torch.Tensor:
    """Entropy of the distribution renormalised over each row's ``top_k`` highest scores
    (logits or log-probabilities: the same, a shift cancels): ``(n, V) -> (n,)``."""
    top = scores if scores.shape[-1] <= top_k else scores.topk(top_k, dim=-1).values
    renorm = top - top.logsumexp(dim=-1, keepdim=True)
    p = renorm.exp()
    return -torch.special.xlogy(p, p).sum(dim=-1)  # xlogy: a -inf logit contributes 0, not NaN


def entropy_of(top: Mapping[str, float | None] | Iterable[float | None],
               k: int | None = TOP_K) -> float:
    """Entropy (nats) of one position's alternatives as the API gives them (``top_logprobs``:
    a mapping token -> log-probability, or the values alone): :func:`topk_entropy` over
    the ``k`` highest (all with ``k=None``), in float64. Missing and non-finite values are
    skipped; NaN when none is left."""
    values = top.values() if isinstance(top, Mapping) else top
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return float("nan")
    scores = torch.tensor([finite], dtype=torch.float64)
    return float(topk_entropy(scores, len(finite) if k is None else k)[0])


__all__ = ["TOKEN_FEATURES", "TOKEN_FEATURES_ENV", "TOP_K", "TokenFeature", "entropy_of",
           "parse_token_features", "token_features", "topk_entropy"]
