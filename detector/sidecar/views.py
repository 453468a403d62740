"""What a read of a request returns: its analysis, and where a view's verdicts stand.

Plain data, apart from the code that makes it (:mod:`detector.sidecar.analysis` from
scratch, :mod:`detector.sidecar.incremental` as tokens arrive) so both, and the readers
(the gRPC service, telemetry, metrics), import it without importing each other.
"""

from __future__ import annotations

import dataclasses

from detector.claims import ResponseVerdict, sentences
from detector.drift import ResponseDrift, response_drift
from detector.sidecar.spans import SpanVerdict
from detector.sidecar.records import RequestRecord
from detector.sidecar.scores import TokenScore
from detector.sidecar.text import DecodedText


@dataclasses.dataclass(frozen=True, slots=True)
class ViewState:
    """Where a view's verdicts stand, for a stream that sends each closed span once:
    ``verdicts[:claims]`` judge claims, of which the first ``fixed_claims`` (and the first
    ``fixed_sentences`` sentence verdicts after them) only change where ``rejudged_since``
    says."""

    view: object  # which view: a new one starts its stream's look anew
    stamp: int  # how many times the view has judged fixed verdicts again
    claims: int
    fixed_claims: int
    fixed_sentences: int
    open_from: int  # where the last sentence that may still grow begins
    # The last re-judgings: (stamp, first claim verdict, first sentence verdict) judged
    # again; a copy, so a stream reads it without the analysis's lock.
    log: tuple[tuple[int, int, int], ...] = ()

    def rejudged_since(self, stamp: int) -> tuple[int, int] | None:
        """The lowest fixed claim and sentence verdict indices judged again after
        ``stamp``; None when the log no longer reaches back that far."""
        if stamp == self.stamp:
            return (self.fixed_claims, self.fixed_sentences)
        if not self.log or self.log[0][0] > stamp + 1:
            return None
        later = [(cv, sv) for st, cv, sv in self.log if st > stamp]
        return (min(cv for cv, _ in later), min(sv for _, sv in later))


@dataclasses.dataclass(frozen=True, slots=True)
class RequestAnalysis:
    record: RequestRecord
    tokens: list[TokenScore]
    decoded: DecodedText | None
    verdicts: list[SpanVerdict]
    # One per probe: flagged when any claim span is (empty without a decoder or probes).
    responses: list[ResponseVerdict]
    # Where an incremental analysis's verdicts stand (None from :meth:`Analyzer.analyse`).
    state: ViewState | None = None
    # The request as the store has it (``record`` is cut to what the client received: a
    # matched stop string ends it); set by :meth:`Analyzer.current`.
    stored: RequestRecord | None = None

    @property
    def open_from(self) -> int:
        """Where the last sentence that may still grow begins (``len(text)`` if none may):
        spans before it are final."""
        if self.state is not None:
            return self.state.open_from
        text = self.text
        spans = sentences(text)
        if not spans:
            return len(text)
        start, end = spans[-1]
        return start if end >= len(text.rstrip()) else len(text)

    @property
    def drift(self) -> list[ResponseDrift]:
        """Per probe with a training summary: how many of the response's scored rows lie
        outside it (counted from the per-token flags, over the tokens returned)."""
        return response_drift([t.outside for t in self.tokens])

    @property
    def text(self) -> str:
        return self.decoded.text if self.decoded else ""


__all__ = ["RequestAnalysis", "ViewState"]
