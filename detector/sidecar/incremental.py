"""A request's analysis kept up to date as its tokens arrive: decoded once, cut once.

Every read of a request (GetScores, each StreamScores update, the finish accounting) used
to copy the request, resolve every token's scores, decode the whole answer with a fresh
decoder and cut all its claims and sentences again: O(answer) per read, O(answer^2) per
stream, under the GIL the scoring thread needs. A :class:`LiveAnalysis` lives with its
request (``RequestRecord.live``) and advances by what changed since it last read
(:meth:`RequestStore.delta`): new tokens are decoded and cut, claims and sentences that can
no longer change keep their verdicts, and only the open tail (and claims whose tokens were
scored again) is judged again. What it returns equals :meth:`Analyzer.analyse` of the same
tokens, the from-scratch reference the tests compare it with.

Two views are kept: every token (GetScores, the finish accounting) and only the leading
tokens whose scores are final (a running stream's updates).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from detector.channel.wire import StopRule
from detector.claims import ClaimCutter, ResponseVerdict, SentenceCutter
from detector.sidecar.spans import (
    Probe,
    Span,
    SpanVerdict,
    claim_span,
    judge_claim,
    judge_probes,
    judge_sentence,
)
from detector.sidecar.stops import partial_stop_start
from detector.sidecar.records import RecordDelta, RequestRecord
from detector.sidecar.scores import ProbeColumns, TokenScore
from detector.sidecar.text import DecodedText, PieceStream, TextDecoder
from detector.sidecar.views import RequestAnalysis, ViewState
from detector.verdict import VerdictModel

# Memory per generated token an analysis holds (token scores, offsets, text, spans and
# verdicts of both views: about 1 KB measured with 3 probes), counted against the store's
# bound with the request's rows.
TOKEN_NBYTES = 1024
REJUDGE_LOG = 64  # rejudged ranges a stream can catch up on without a full rescan


class _Scores(Sequence[dict[str, float]]):
    """``tokens[i].scores`` of a view's first ``n`` tokens, without copying them."""

    __slots__ = ("tokens", "n")

    def __init__(self, tokens: list[TokenScore], n: int) -> None:
        self.tokens, self.n = tokens, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, float]:  # type: ignore[override]
        return self.tokens[i].scores


class _View:
    """The claims, sentences and verdicts of one view of a request's text, kept as it grows."""

    def __init__(self, prompt: str, probes: list[Probe],
                 fused: Mapping[str, tuple[VerdictModel, float]], kinds: Sequence[str]) -> None:
        self.claims = ClaimCutter(prompt)
        self.sentences = SentenceCutter()
        self.probes = probes
        self.fused = fused
        self.kinds = kinds
        self.index = {name: i for i, (name, _, _) in enumerate(probes)}
        self.spans: list[Span] = []  # fixed claims that cover tokens
        self.claims_seen = 0  # of ``claims.fixed`` turned into spans
        self.flat_cv: list[SpanVerdict] = []
        self.cv_start: list[int] = []  # per fixed span: its first verdict in flat_cv
        # Per probe (highest score, claims, flagged claims) over fixed spans [0, i).
        self.agg: list[tuple[tuple[float | None, int, int], ...]] = [
            tuple((None, 0, 0) for _ in probes)]
        self.flat_sv: list[SpanVerdict] = []
        self.sv_start: list[int] = []  # per judged fixed sentence
        self.dirty: int | None = None  # lowest token whose scores changed since judged
        self.match: tuple[int, int] | None = None  # a stop string found
        self.searched = 0  # text searched for stop strings
        self.stamp = 0
        self.log: deque[tuple[int, int, int]] = deque(maxlen=REJUDGE_LOG)
        self.judged_claims = 0
        self.judged_sentences = 0

    # ------------------------------------------------------------------ stop strings
    def stops(self, text: str, starts: list[int], ends: list[int], n: int,
              rule: StopRule | None, final: bool) -> tuple[int, int, bool] | None:
        """``stops.apply_stops`` of the first ``n`` tokens: (tokens kept, text kept,
        whether a stop matched); None when the text is shorter than already searched."""
        ln = ends[n - 1] if n else 0
        if rule is None:
            return n, ln, False
        if rule.min_tokens < n and self.match is None:
            if ln < self.searched:
                return None
            check_from = ends[rule.min_tokens - 1] if rule.min_tokens else 0
            best = None
            for stop in rule.strings:
                lo = max(check_from - len(stop) + 1, self.searched - len(stop) + 1, 0)
                start = text.find(stop, lo, ln)
                if start != -1 and (best is None or start + len(stop) < best[1]):
                    best = (start, start + len(stop))
            self.searched = ln
            self.match = best
        match = self.match if rule.min_tokens < n else None
        if match is not None:
            cut = match[1] if rule.include_in_output else match[0]
            return bisect.bisect_left(starts, cut, 0, n), cut, True
        if final or rule.include_in_output:
            return n, ln, False
        hold = partial_stop_start(text, rule, ln)
        kept = min(bisect.bisect_left(starts, hold, 0, n), bisect.bisect_right(ends, hold, 0, n))
        return kept, ends[kept - 1] if kept else 0, False

    # ------------------------------------------------------------------ judging
    def _judge(self, span: Span, scores: _Scores, logprob: list[float] | None
               ) -> list[SpanVerdict]:
        self.judged_claims += 1
        return judge_claim(span, scores, self.probes, self.fused,
                           logprob if self.fused else None)

    def _add_fixed(self, span: Span, verdicts: list[SpanVerdict]) -> None:
        self.spans.append(span)
        self.cv_start.append(len(self.flat_cv))
        self.flat_cv += verdicts
        self.agg.append(self._combine(self.agg[-1], verdicts))

    def _combine(self, agg: tuple[tuple[float | None, int, int], ...],
                 verdicts: Sequence[SpanVerdict]) -> tuple[tuple[float | None, int, int], ...]:
        """``response_verdict``'s max, count and flagged count, carried on over more
        claim verdicts (in order: ``max`` keeps the first of equal scores)."""
        out = list(agg)
        for v in verdicts:
            i = self.index[v.probe]
            top, count, flagged = out[i]
            score = float(v.score)
            out[i] = (score if top is None or score > top else top, count + 1,
                      flagged + (score >= self.probes[i][2]))
        return tuple(out)

    def _rejudge(self, scores: _Scores, logprob: list[float] | None) -> None:
        """Judge again the fixed claims that cover a token scored again, and forget the
        verdicts of the sentences holding them."""
        d, self.dirty = self.dirty, None
        if d is None:
            return
        j = bisect.bisect_right(self.spans, d, key=lambda s: s.token_end)
        if j >= len(self.spans):
            return
        redo = self.spans[j:]
        cv_from = self.cv_start[j]
        del self.spans[j:], self.cv_start[j:], self.agg[j + 1:], self.flat_cv[cv_from:]
        for span in redo:
            self._add_fixed(span, self._judge(span, scores, logprob))
        s = bisect.bisect_right(self.sentences.fixed, redo[0].char_start, 0,
                                len(self.sv_start), key=lambda se: se[1])
        sv_from = self.sv_start[s] if s < len(self.sv_start) else len(self.flat_sv)
        del self.sv_start[s:], self.flat_sv[sv_from:]
        self.stamp += 1
        self.log.append((self.stamp, cv_from, sv_from))

    def _inside(self, verdicts: list[SpanVerdict], start: int, end: int) -> list[SpanVerdict]:
        """The claim verdicts (in order, sorted by span) lying within [start, end]."""
        lo = bisect.bisect_left(verdicts, start, key=lambda v: v.span.char_start)
        hi = bisect.bisect_right(verdicts, end, key=lambda v: v.span.char_start)
        return [v for v in verdicts[lo:hi] if v.span.char_end <= end]

    def judge(self, decoded: DecodedText, end: int, tokens: list[TokenScore], k: int,
              logprob: list[float] | None) -> tuple[list[SpanVerdict], list[ResponseVerdict],
                                                    ViewState]:
        """Verdicts and response verdicts of the view's text ``decoded.text`` (``end``
        characters of the request's text)."""
        text = decoded.text
        scores = _Scores(tokens, k)
        n_fixed, tail_claims = self.claims.claims(text, end)
        self._rejudge(scores, logprob)
        for claim in self.claims.fixed[self.claims_seen:n_fixed]:
            span = claim_span(decoded, claim)
            if span is not None:
                self._add_fixed(span, self._judge(span, scores, logprob))
        self.claims_seen = n_fixed
        tail_cv: list[SpanVerdict] = []
        for claim in tail_claims:
            span = claim_span(decoded, claim)
            if span is not None:
                tail_cv += self._judge(span, scores, logprob)
        claim_verdicts = self.flat_cv + tail_cv
        n_sent, tail_sentences = self.sentences.sentences(text, end)
        fixed_sentences = self.sentences.fixed
        tail_sv: list[SpanVerdict] = []
        if "sentence" in self.kinds:
            frontier = self.claims.frontier()
            for i in range(len(self.sv_start), n_sent):
                start, stop = fixed_sentences[i]
                if stop > frontier:
                    break  # a claim inside may still appear or change
                self.sv_start.append(len(self.flat_sv))
                self.judged_sentences += 1
                self.flat_sv += judge_sentence(decoded, start, stop,
                                               self._inside(self.flat_cv, start, stop),
                                               self.probes)
            for start, stop in fixed_sentences[len(self.sv_start):n_sent] + tail_sentences:
                self.judged_sentences += 1
                tail_sv += judge_sentence(decoded, start, stop,
                                          self._inside(claim_verdicts, start, stop),
                                          self.probes)
        agg = self._combine(self.agg[len(self.spans)], tail_cv)
        responses = [ResponseVerdict(name, top if top is not None else math.nan, threshold,
                                     flagged > 0, count, flagged)
                     for (name, _, threshold), (top, count, flagged) in zip(self.probes, agg)]
        claims_out = claim_verdicts if "claim" in self.kinds else []
        verdicts = claims_out + self.flat_sv + tail_sv
        last = tail_sentences[-1] if tail_sentences else (
            fixed_sentences[n_sent - 1] if n_sent else None)
        stripped = end
        while stripped and text[stripped - 1].isspace():
            stripped -= 1
        open_from = last[0] if last is not None and last[1] >= stripped else end
        state = ViewState(self, self.stamp, len(claims_out),
                          len(self.flat_cv) if claims_out else 0, len(self.flat_sv), open_from,
                          tuple(self.log))
        return verdicts, responses, state


class LiveAnalysis:
    """One request's analysis, advanced by what changed (see the module's docstring).
    Callers hold ``lock`` while they advance and read it."""

    def __init__(self, decoder: TextDecoder | None, kinds: Sequence[str]) -> None:
        self.lock = threading.Lock()
        self.decoder = decoder
        self.kinds = tuple(kinds)
        self.columns: ProbeColumns | None = None
        self.record: RequestRecord | None = None
        self.version = -1
        self.resets = 0
        self.views_made = 0
        self.retired = {"claim_cuts": 0, "sentence_cuts": 0, "claims_judged": 0,
                        "sentences_judged": 0}  # the work of views dropped
        self.decoded = 0  # tokens decoded, all resets included
        self._reset()

    def _reset(self) -> None:
        self.read = 0
        self.pieces: PieceStream | None = None
        self.prompt_tail: list[int] = []
        self._prompt: str | None = None
        self.text = ""
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.tokens: list[TokenScore] = []
        self.logprob: list[float] | None = None
        self.settled = 0
        for view in getattr(self, "views", {}).values():
            self._retire(view)
        self.views: dict[bool, _View] = {}
        self.cache: dict[bool, RequestAnalysis] = {}
        self.resets += 1

    @property
    def nbytes(self) -> int:
        return TOKEN_NBYTES * len(self.tokens) + 2 * len(self.text)

    def work(self) -> dict[str, int]:
        """What this analysis has done so far (tests pin that a step's work does not grow
        with the answer)."""
        out = dict(self.retired)
        for view in self.views.values():
            for name, count in _view_work(view).items():
                out[name] += count
        return {"decoded": self.decoded, **out, "resets": self.resets,
                "views_made": self.views_made}

    def _retire(self, view: _View) -> None:
        for name, count in _view_work(view).items():
            self.retired[name] += count

    def restart(self, decoder: TextDecoder | None) -> None:
        """Start again from the first token (another tokenizer, other probes)."""
        self.decoder = decoder
        self.columns = None
        self._reset()

    def advance(self, delta: RecordDelta) -> None:
        """Take what changed (``delta.start`` is 0 or what was read before)."""
        if delta.columns is not self.columns or delta.restart or (delta.start == 0 and self.read):
            self._reset()
            self.columns = delta.columns
        self.record = delta.record
        self.version = delta.record.version
        if delta.start == 0 and not self.read:
            self.prompt_tail = delta.prompt_tail
            self._prompt = None
            if self.decoder is not None:
                self.pieces = self.decoder.stream(delta.prompt_tail)
        if self.pieces is not None:
            pos = len(self.text)
            pieces = []
            self.decoded += len(delta.token_ids)
            for token in delta.token_ids:
                piece = self.pieces.step(token)
                pieces.append(piece)
                self.starts.append(pos)
                pos += len(piece)
                self.ends.append(pos)
            self.text += "".join(pieces)
        self.read = delta.start + len(delta.token_ids)
        f = delta.scores_from
        self.tokens[f:] = delta.tokens
        if delta.logprob is not None:
            self.logprob = (self.logprob or [])[:f] + delta.logprob
        for view in self.views.values():
            view.dirty = f if view.dirty is None else min(view.dirty, f)
        self.settled = min(self.settled, f)
        while self.settled < len(self.tokens) and self.tokens[self.settled].settled:
            self.settled += 1
        self.cache.clear()

    def prompt(self) -> str:
        """The prompt's tail as text: names copied from it are no claim (detector.claims)."""
        if self._prompt is None:
            self._prompt = self.decoder.text_of(self.prompt_tail) if self.decoder else ""
        return self._prompt

    def view(self, settled_only: bool) -> RequestAnalysis:
        """The analysis of every token, or of the leading tokens whose scores are final."""
        cached = self.cache.get(settled_only)
        if cached is not None:
            return cached
        record = self.record
        assert record is not None, "advance first"
        if record.finished and not settled_only and True in self.views:
            # A stream reads every token once the request ended: the settled view is done.
            self._retire(self.views.pop(True))
        n = self.settled if settled_only else len(self.tokens)
        if self.pieces is None:
            out = RequestAnalysis(record, self.tokens[:n], None, [], [], stored=record)
            self.cache[settled_only] = out
            return out
        while True:
            view = self.views.get(settled_only)
            if view is None:
                view = self.views[settled_only] = self._new_view()
            cut = view.stops(self.text, self.starts, self.ends, n, record.stop, record.finished)
            if cut is not None and view.claims.can_cut(cut[1]) and \
                    view.sentences.can_cut(cut[1]):
                break
            self._retire(self.views.pop(settled_only))  # the text got shorter: anew
        k, end, stopped = cut
        ends = self.ends[:k]
        over = bisect.bisect_right(ends, end)
        if over < k:
            ends[over:] = [end] * (k - over)
        decoded = DecodedText(self.text[:end], self.starts[:k], ends)
        if stopped and not record.finished:
            record = dataclasses.replace(record, finished=True)
        columns = self.columns
        verdicts: list[SpanVerdict] = []
        responses: list[ResponseVerdict] = []
        state = None
        if columns is not None and columns.names:
            verdicts, responses, state = view.judge(decoded, end, self.tokens, k, self.logprob)
        out = RequestAnalysis(record, self.tokens[:k], decoded, verdicts, responses, state,
                              self.record)
        self.cache[settled_only] = out
        return out

    def _new_view(self) -> _View:
        self.views_made += 1
        columns = self.columns
        if columns is None or not columns.names:
            return _View(self.prompt(), [], {}, self.kinds)
        probes = list(zip(columns.names, columns.aggregations, columns.thresholds))
        fused = {n: v for n, v in zip(columns.names, columns.verdicts) if v is not None}
        view = _View(self.prompt(), judge_probes(probes, fused), fused, self.kinds)
        return view


def _view_work(view: _View) -> dict[str, int]:
    return {"claim_cuts": view.claims.cuts, "sentence_cuts": view.sentences.cuts,
            "claims_judged": view.judged_claims, "sentences_judged": view.judged_sentences}


class StreamCursor:
    """The spans a stream has sent, and how far into a view's fixed verdicts it has looked:
    each update looks only at what is new or was judged again, yet sends exactly what
    scanning every verdict would (each span once, when closed)."""

    def __init__(self) -> None:
        self.sent: set[tuple[str, int, int, str]] = set()
        self._view: object = None
        self._stamp = 0
        self._claims = 0  # fixed claim verdicts before this are all sent
        self._sentences = 0

    def closed(self, analysis: RequestAnalysis, done: bool) -> list[SpanVerdict]:
        """The verdicts of ``analysis`` to send now: closed (the sentence holding them has
        ended and text follows, or ``done``: a name can still grow, "New" -> "New York"),
        and not sent before."""
        verdicts: list[SpanVerdict] = analysis.verdicts
        state: ViewState | None = analysis.state
        if not verdicts:
            return []
        open_from = 0 if done else analysis.open_from
        if done or state is None:
            closed = [v for v in verdicts if (done or v.span.char_end <= open_from)
                      and _key(v) not in self.sent]
            self._view = None
            self.sent.update(_key(v) for v in closed)
            return closed
        if state.view is not self._view:
            self._view, self._claims, self._sentences = state.view, 0, 0
        else:
            back = state.rejudged_since(self._stamp)
            if back is None:
                self._claims = self._sentences = 0
            else:
                self._claims = min(self._claims, back[0])
                self._sentences = min(self._sentences, back[1])
        self._stamp = state.stamp
        out: list[SpanVerdict] = []

        def scan(lo: int, fixed: int, hi: int) -> int:
            """Send the closed, unsent ``verdicts[lo:hi]`` in order. The fixed ones, up to
            ``fixed``, lie in order of their ends: the scan of those stops at the first
            open one. Returns how far the fixed ones are all closed (and so sent)."""
            cursor = lo
            for i in range(lo, hi):
                v = verdicts[i]
                if v.span.char_end <= open_from:
                    if _key(v) not in self.sent:
                        out.append(v)
                        self.sent.add(_key(v))
                    if i < fixed:
                        cursor = i + 1
                elif i < fixed:
                    break
            return cursor

        self._claims = _scan_regions(scan, self._claims, state.fixed_claims, state.claims)
        s0 = state.claims
        self._sentences = _scan_regions(scan, s0 + self._sentences,
                                        s0 + state.fixed_sentences, len(verdicts)) - s0
        return out


def _scan_regions(scan: Callable[[int, int, int], int], lo: int, fixed_hi: int, hi: int
                  ) -> int:
    """Scan the fixed region from ``lo`` up to the first open verdict, then the tail."""
    cursor = scan(lo, fixed_hi, fixed_hi)
    scan(fixed_hi, fixed_hi, hi)
    return cursor


def _key(v: SpanVerdict) -> tuple[str, int, int, str]:
    return (v.span.kind, v.span.char_start, v.span.char_end, v.probe)
