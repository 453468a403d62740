"""Judge a response's claim spans, and derive sentence and response verdicts from them.

What counts as a claim, which tokens it covers and how their scores aggregate is decided
by :mod:`detector.claims`, the module training and evaluation use too, so the sidecar
judges exactly the spans the probe was trained and measured on. Span kinds:

- ``claim``: a name, number, date or short answer the model asserts (never a function word,
  a pronoun or a name copied from the prompt);
- ``sentence``: judged by the highest claim inside it, flagged only when one of its claims
  is; a sentence without a scored claim gets no verdict.

The response verdict per probe (any claim flagged) is :func:`detector.claims.response_verdict`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from detector.claims import (
    Claim,
    ResponseVerdict,
    aggregate,
    claim_tokens,
    find_claims,
    response_verdict,
    sentences,
)
from detector.sidecar.text import DecodedText
from detector.verdict import VerdictModel, claim_signals

SPAN_KINDS = ("claim", "sentence")


@dataclass(frozen=True, slots=True)
class Span:
    kind: str
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    text: str


@dataclass(frozen=True, slots=True)
class SpanVerdict:
    span: Span
    probe: str
    score: float
    threshold: float
    flagged: bool


def claim_span(decoded: DecodedText, claim: Claim) -> Span | None:
    """A claim as a span, with the generated tokens it covers (None: it covers none)."""
    tokens = claim_tokens(decoded.starts, decoded.ends, claim)
    if tokens is None:
        return None
    return Span("claim", claim.start, claim.end, tokens[0], tokens[1], claim.text)


def find_spans(decoded: DecodedText, prompt: str = "") -> list[Span]:
    """The claim spans of the generated text, each with the generated tokens it covers."""
    spans = []
    for claim in find_claims(decoded.text, prompt=prompt):
        span = claim_span(decoded, claim)
        if span is not None:
            spans.append(span)
    return spans


Probe = tuple[str, str, float]  # name, aggregation, threshold


def judge_probes(probes: Sequence[Probe], verdicts: Mapping[str, tuple[VerdictModel, float]]
                 ) -> list[Probe]:
    """The probes as claims are judged: a probe with a verdict model by its threshold."""
    return [(name, how, verdicts[name][1] if name in verdicts else threshold)
            for name, how, threshold in probes]


def judge_claim(span: Span, token_scores: Sequence[dict[str, float]], probes: Sequence[Probe],
                verdicts: Mapping[str, tuple[VerdictModel, float]],
                logprobs: Sequence[float] | None) -> list[SpanVerdict]:
    """One claim's verdicts, one per probe that scored any of its tokens (``probes`` as
    :func:`judge_probes` gives them)."""
    out = []
    for name, how, threshold in probes:
        values = [token_scores[i][name] for i in range(span.token_start, span.token_end)
                  if i < len(token_scores) and name in token_scores[i]]
        if values:
            score = aggregate(values, how)
            if name in verdicts:
                lps = list((logprobs or [])[span.token_start:span.token_end])
                score = verdicts[name][0].claim_probability(claim_signals(values, lps, how))
            out.append(SpanVerdict(span, name, score, threshold, score >= threshold))
    return out


def judge_sentence(decoded: DecodedText, start: int, end: int,
                   inside: Sequence[SpanVerdict], probes: Sequence[Probe]) -> list[SpanVerdict]:
    """A sentence's verdicts from the claim verdicts ``inside`` it: per probe, its highest
    claim's (none for a probe without a claim verdict inside)."""
    out = []
    for name, _, threshold in probes:
        mine = [v for v in inside if v.probe == name]
        if not mine:
            continue
        top = max(mine, key=lambda v: v.score)
        tokens = claim_tokens(decoded.starts, decoded.ends, (start, end))
        assert tokens is not None  # it holds a claim, which covers tokens
        span = Span("sentence", start, end, tokens[0], tokens[1], decoded.text[start:end])
        out.append(SpanVerdict(span, name, top.score, threshold, top.flagged))
    return out


def judge_spans(
    decoded: DecodedText,
    claims: Sequence[Span],
    token_scores: Sequence[dict[str, float]],
    probes: Sequence[Probe],
    kinds: Sequence[str] = SPAN_KINDS,
    *,
    verdicts: Mapping[str, tuple[VerdictModel, float]] | None = None,
    logprobs: Sequence[float] | None = None,
) -> tuple[list[SpanVerdict], list[ResponseVerdict]]:
    """Span verdicts of the requested kinds, and one response verdict per probe.

    ``probes`` lists (name, aggregation, threshold); ``token_scores[i]`` maps probe name to
    the calibrated probability of generated token i (absent when unscored). A claim with no
    scored token has no verdict. A probe named in ``verdicts`` (its verdict model and the
    threshold chosen on it) judges each claim by the verdict's probability, which also reads
    the claim's token ``logprobs`` (one per generated token, NaN where unknown).
    """
    verdicts = verdicts or {}
    probes = judge_probes(probes, verdicts)
    claim_verdicts: list[SpanVerdict] = []
    for span in claims:
        claim_verdicts += judge_claim(span, token_scores, probes, verdicts, logprobs)
    out = list(claim_verdicts) if "claim" in kinds else []
    if "sentence" in kinds:
        for start, end in sentences(decoded.text):
            inside = [v for v in claim_verdicts
                      if v.span.char_start >= start and v.span.char_end <= end]
            out += judge_sentence(decoded, start, end, inside, probes)
    responses = [response_verdict(name, threshold,
                                  [v.score for v in claim_verdicts if v.probe == name])
                 for name, _, threshold in probes]
    return out, responses
