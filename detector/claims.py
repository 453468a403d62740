"""Claim spans: the one notion of "what a verdict judges", shared by training, evaluation and serving.

A fabrication detector is only as right as the spans it judges. Judging every capitalised run
and every sentence by the max of its token scores flags "The" and "He"; training on one
notion of a span and serving another is train/serve skew by another door. So this module
alone decides:

- **which character spans carry a claim** (:func:`find_claims`): names, places and titles
  (runs of capitalised words, joined across lowercase connectors such as "of", "and", "de"),
  numbers and dates ("1776", "July 4, 1776", "3.14"), and the core of a short one-line
  answer ("euro" in "The currency of Spain is the euro."). Not claims: sentence-initial
  function words and pronouns ("The", "He", "In"), and names whose every word is copied
  from the prompt ("France" in an answer to "What is the capital of France?");
- **which generated tokens a claim covers** (:func:`claim_tokens`): those overlapping it;
- **how token scores become a claim score** (:func:`aggregate`, :func:`aggregate_segments`):
  max by default, one fabricated token makes the claim fabricated;
- **how sentence and response verdicts derive from claims** (:func:`sentence_claims`,
  :func:`response_verdict`): a sentence or a response is flagged when a claim inside it is,
  never because of a function word.

``probes.capture`` trains on the claims of this module that carry the labelled answer,
``probes.evaluate`` and ``benchmarks/heldout.py`` score them, and the sidecar's
``detector.sidecar.spans`` judges them.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ClaimKind = Literal["name", "number", "date", "answer"]
AGGREGATIONS = ("max", "mean")

# A short one-line answer whose core is at most this many words is itself a claim; a
# longer one is a description or an evasion, not one claim to judge (training labels
# such answers ambiguous, probes.labeling).
MAX_ANSWER_WORDS = 6

_WORD = re.compile(r"[^\W_](?:(?:[\w'’.\-]|,(?=\d{3}\b))*[^\W_])?", re.UNICODE)
_NUMBER = re.compile(r"^\d[\d,.]*(?:st|nd|rd|th|s)?$")
_SENTENCE = re.compile(r"\S.*?(?:[.!?](?=\s|$)|\n|$)", re.DOTALL)
_MONTHS = {"january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december", "jan", "feb", "mar", "apr", "jun",
           "jul", "aug", "sep", "sept", "oct", "nov", "dec"}
# Lowercase words that may sit inside a multi-word name ("Rio de Janeiro", "University of
# Oxford"); never at its ends. Not "and": "Paris and London" are two claims, each judged on
# its own (so "Bosnia and Herzegovina" is two as well).
_CONNECTORS = {"of", "de", "da", "do", "dos", "das", "di", "del", "della", "la", "le", "les",
               "van", "von", "der", "den", "du", "the", "upon", "al", "el", "bin", "ibn"}
# Capitalised words that carry no claim of their own: function words, pronouns, discourse
# markers and answer lead-ins. Stripped from the start of a run; a run of only these is
# no claim ("The", "He", "In 1990" keeps "1990").
_FUNCTION_WORDS = {
    "the", "a", "an", "he", "she", "it", "they", "we", "i", "you", "his", "her", "hers", "its",
    "their", "our", "my", "your", "this", "that", "these", "those", "there", "here", "in", "on",
    "at", "by", "for", "from", "to", "with", "of", "as", "after", "before", "during", "since",
    "until", "when", "while", "where", "which", "who", "whom", "whose", "what", "why", "how",
    "and", "but", "or", "so", "yet", "also", "however", "although", "though", "because", "if",
    "then", "thus", "today", "yes", "no", "not", "is", "was", "are", "were", "be", "been",
    "has", "have", "had", "do", "does", "did", "can", "could", "will", "would", "shall",
    "should", "may", "might", "must", "some", "many", "most", "all", "both", "each", "every",
    "other", "another", "such", "one", "once", "now", "well", "sure", "certainly", "indeed",
    "answer", "a:", "q", "a", "q:", "note", "overall", "additionally", "furthermore",
    "moreover", "finally", "first", "second", "third", "born", "later", "early", "known",
    "as", "its", "it's", "he's", "she's", "there's", "let", "let's", "please", "hello", "hi",
    "capital", "currency", "language", "languages", "country", "city", "state", "element",
}  # fmt: skip
_RESTATEMENT_VERB = re.compile(r"\b(?:is|was|are|were)\b\s+(?:called\s+|named\s+|known as\s+)?",
                               re.IGNORECASE)
_CLAUSE_BREAKS = (", ", " (", "(", "; ", " - ", " – ", " — ", ": ", " which ", " and is ")
_TRAILING = " \t.,;:!?\"')]}"
_ABBREVIATIONS = {"st", "mt", "ft", "dr", "mr", "mrs", "ms", "jr", "sr", "no", "vs", "gen", "prof"}


@dataclass(frozen=True, slots=True)
class Claim:
    """A claim span of generated text: characters ``[start, end)``."""

    start: int
    end: int
    text: str
    kind: ClaimKind


def ascii_fold(text: str) -> str:
    """``text`` without accents: NFKD, then ASCII only ("São Tomé" -> "Sao Tome"); letters
    with no ASCII form are dropped ("東京" -> ""). The one accent folding of claims,
    labels and the datasets."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def fold(text: str) -> str:
    """Accent-, case- and punctuation-insensitive form of a word or phrase."""
    text = ascii_fold(text) or text
    return re.sub(r"[^\w]+", " ", text.lower()).strip()


def _is_capitalised(word: str) -> bool:
    first = word[0]
    return first.isupper() or first.isdigit()


def _is_number(word: str) -> bool:
    return bool(_NUMBER.match(word))


def _words(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


class _RunBuilder:
    """:func:`_runs` one word at a time: the run being built and the connectors waiting
    for a capitalised word. Fed the words of a text in order, it returns each run as it
    closes, so a growing text's runs are cut once (:class:`ClaimCutter`)."""

    __slots__ = ("run", "pending")

    def __init__(self) -> None:
        self.run: list[tuple[int, int]] = []
        self.pending: list[tuple[int, int]] = []  # connectors waiting for a capitalised word

    def copy(self) -> _RunBuilder:
        other = _RunBuilder()
        other.run, other.pending = list(self.run), list(self.pending)
        return other

    def feed(self, text: str, s: int, e: int) -> list[tuple[int, int]] | None:
        """Take the word ``text[s:e]``; returns the run it closes, if any."""
        run, pending = self.run, self.pending
        closed = None
        word = text[s:e]
        prev_end = (pending or run)[-1][1] if (pending or run) else None
        gap = text[prev_end:s] if prev_end is not None else ""
        joined = prev_end is not None and gap in (" ", ", ", "-", " - ") and (
            gap != ", " or (_is_number(word) and any(
                text[a:b].lower() in _MONTHS or _is_number(text[a:b]) for a, b in run[-2:])))
        if _is_capitalised(word):
            if pending and _is_number(word):
                joined = False  # "3 and 4" are two claims; connectors join names only
            if run and joined:
                run += pending + [(s, e)]
            else:
                if run:
                    closed = run
                run = [(s, e)]
            pending = []
        elif (run and joined and word.lower() in _CONNECTORS and len(pending) < 2
              and not _is_number(text[run[-1][0]:run[-1][1]])):
            pending.append((s, e))
        elif run and joined and word.lower() in _MONTHS:
            run += pending + [(s, e)]
            pending = []
        else:
            if run:
                closed = run
            run, pending = [], []
        self.run, self.pending = run, pending
        return closed

    def close(self) -> list[tuple[int, int]] | None:
        """The run still open when the text ends (None without one)."""
        return self.run or None


def _runs(text: str, words: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Consecutive capitalised/numeric words on one line, joined across single spaces,
    date commas ("July 4, 1776") and lowercase connectors between capitalised words."""
    runs: list[list[tuple[int, int]]] = []
    builder = _RunBuilder()
    for s, e in words:
        closed = builder.feed(text, s, e)
        if closed is not None:
            runs.append(closed)
    last = builder.close()
    if last is not None:
        runs.append(last)
    return runs


def _kind(words: list[str]) -> ClaimKind:
    if all(_is_number(w) for w in words):
        return "number"
    if any(w.lower() in _MONTHS for w in words) and any(_is_number(w) for w in words):
        return "date"
    return "name"


def _prompt_words(prompt: str) -> set[str]:
    return set(fold(prompt).split())


def _run_claim(text: str, run: list[tuple[int, int]], seen: set[str]) -> Claim | None:
    """The claim a run of words makes: function words and pronouns stripped from its start,
    connectors from its end; none when nothing is left or a name is copied from the prompt
    (``seen``: the prompt's folded words)."""
    while run and text[run[0][0]:run[0][1]].lower() in _FUNCTION_WORDS and not _is_number(
            text[run[0][0]:run[0][1]]):
        run = run[1:]
    while run and text[run[-1][0]:run[-1][1]].lower() in _CONNECTORS:
        run = run[:-1]
    if not run:
        return None
    tokens = [text[s:e] for s, e in run]
    kind = _kind(tokens)
    if kind == "name":
        content = [fold(t) for t in tokens if t.lower() not in _CONNECTORS]
        if seen and all(w in seen for c in content for w in c.split()):
            return None  # copied from the prompt: no new claim
    return Claim(run[0][0], run[-1][1], text[run[0][0]:run[-1][1]], kind)


def _answer_claim(text: str, span: tuple[int, int] | None, seen: set[str],
                  claims: Sequence[Claim]) -> tuple[int, Claim] | None:
    """The short answer's claim and where it goes in ``claims`` (sorted, not overlapping),
    or None: no answer, one that overlaps a claim, or one copied from the prompt."""
    if span is None:
        return None
    s, e = span
    # Claims are sorted and disjoint: only the last one starting before the answer's end
    # can overlap it.
    i = bisect.bisect_left(claims, e, key=lambda c: c.start)
    if i and claims[i - 1].end > s:
        return None
    core = [fold(w) for w in text[s:e].split()]
    if seen and all(w in seen for c in core for w in c.split()):
        return None
    return bisect.bisect_left(claims, s, key=lambda c: c.start), Claim(s, e, text[s:e], "answer")


def find_claims(text: str, *, prompt: str = "") -> list[Claim]:
    """Claim spans of ``text`` (an answer to ``prompt``), in order, not overlapping."""
    seen = _prompt_words(prompt) if prompt else set()
    claims = [c for run in _runs(text, _words(text))
              if (c := _run_claim(text, run, seen)) is not None]
    answer = _answer_claim(text, _short_answer(text, prompt), seen, claims)
    if answer is not None:
        claims.insert(*answer)
    return claims


def _sentence_end(text: str, start: int, stop: int) -> int:
    """End of the first sentence in text[start:stop] (abbreviations are not ends)."""
    i = start
    while i < stop:
        ch = text[i]
        if ch in "!?;":
            return i
        if ch == "." and (i + 1 >= stop or text[i + 1].isspace()):
            word = re.split(r"\s", text[start:i])[-1]
            bare = word.replace(".", "")
            if "." in word or len(bare) <= 1 or bare.lower() in _ABBREVIATIONS:
                i += 1
                continue
            return i
        i += 1
    return stop


def core_answer(text: str, *, context: str | None = None) -> tuple[int, int] | None:
    """Character span of the core answer of the first line, or None when there is none.

    "The capital of Mongolia is Ulaanbaatar." -> "Ulaanbaatar": a leading restatement (words
    before "is" that share a content word with ``context``), articles, trailing clauses and
    punctuation are trimmed.
    """
    stop = text.find("\n")
    stop = len(text) if stop < 0 else stop
    start = len(text[:stop]) - len(text[:stop].lstrip())
    if start >= stop:
        return None
    end = _sentence_end(text, start, stop)
    m = _RESTATEMENT_VERB.search(text, start, end)
    if m is not None:
        prefix = set(fold(text[start:m.start()]).split())
        keywords = set(fold(context).split()) - _CONTEXT_STOPWORDS if context else set()
        if prefix & keywords:
            start = m.end()
    for article in ("the ", "a ", "an "):
        if text[start:start + len(article)].lower() == article:
            start += len(article)
            break
    for brk in _CLAUSE_BREAKS:
        cut = text.find(brk, start, end)
        if cut > start:
            end = cut
    while end > start and text[end - 1] in _TRAILING:
        end -= 1
    while start < end and text[start] in " \t\"'([{":
        start += 1
    return (start, end) if end > start else None


_CONTEXT_STOPWORDS = {"what", "which", "who", "is", "the", "of", "a", "an", "in", "on", "did",
                      "does", "do", "year", "us", "has", "have", "was", "were", "are", "q",
                      "a", "answer", "question", "user", "assistant"}


def _short_answer(text: str, prompt: str) -> tuple[int, int] | None:
    """The core of a one-line answer of at most ``MAX_ANSWER_WORDS`` words."""
    first = text.split("\n", 1)[0]
    if not first.strip() or len(first.split()) > 3 * MAX_ANSWER_WORDS:
        return None
    span = core_answer(text, context=_last_question(prompt))
    if span is None:
        return None
    s, e = span
    core = text[s:e]
    if not re.search(r"\w", core) or len(core.split()) > MAX_ANSWER_WORDS:
        return None
    if all(w.lower() in _FUNCTION_WORDS for w in re.findall(r"[\w']+", core)):
        return None
    return span


def _last_question(prompt: str) -> str:
    """The last line of the prompt that reads as a question (the one being answered)."""
    lines = [ln for ln in prompt.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "?" in line:
            return line
    return lines[-1] if lines else ""


def claim_tokens(starts: Sequence[int], ends: Sequence[int], claim: Claim | tuple[int, int]
                 ) -> tuple[int, int] | None:
    """Generated tokens ``[t0, t1)`` whose characters ``[starts[i], ends[i])`` overlap the
    claim; None when none does (an empty token never overlaps).

    ``starts`` and ``ends`` are non-decreasing, as the ranges of consecutive token pieces
    are, so two binary searches find the tokens (a scan per claim made judging a long
    answer quadratic)."""
    start, end = (claim.start, claim.end) if isinstance(claim, Claim) else claim
    first = bisect.bisect_right(ends, start)  # the first token ending after the claim starts
    stop = bisect.bisect_left(starts, end)  # the first token starting at or after its end
    while first < stop and ends[first] <= starts[first]:
        first += 1
    while stop > first and ends[stop - 1] <= starts[stop - 1]:
        stop -= 1
    return None if first >= stop else (first, stop)


def aggregate(values: Sequence[float], how: str = "max") -> float:
    """A claim's score from its tokens' scores."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")
    if not len(values):
        raise ValueError("a claim needs at least one scored token")
    return float(max(values)) if how == "max" else float(sum(values) / len(values))


def aggregate_segments(scores: np.ndarray, counts: np.ndarray, how: str = "max") -> np.ndarray:
    """:func:`aggregate` over consecutive segments of ``scores`` of the given lengths
    (each at least 1): the vectorised form training and evaluation use."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")
    counts = np.asarray(counts, dtype=np.int64)
    if not counts.size:
        return np.zeros(0)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if how == "max":
        return np.maximum.reduceat(scores, starts)
    return np.add.reduceat(scores, starts) / counts


def sentences(text: str) -> list[tuple[int, int]]:
    """Sentence (or line) character ranges of ``text``."""
    return [(m.start(), m.end() - (1 if m.group().endswith("\n") else 0))
            for m in _SENTENCE.finditer(text) if m.group().strip()]


@dataclass(frozen=True, slots=True)
class ResponseVerdict:
    """A response's verdict for one probe: flagged when any claim in it is."""

    probe: str
    score: float  # the highest claim score (nan without scored claims)
    threshold: float
    flagged: bool
    claims: int  # claims judged
    flagged_claims: int


def response_verdict(probe: str, threshold: float, claim_scores: Sequence[float]
                     ) -> ResponseVerdict:
    scores = [float(s) for s in claim_scores]
    flagged = sum(s >= threshold for s in scores)
    return ResponseVerdict(probe, max(scores) if scores else float("nan"), threshold,
                           flagged > 0, len(scores), flagged)


__all__ = [
    "AGGREGATIONS",
    "MAX_ANSWER_WORDS",
    "Claim",
    "ClaimKind",
    "ResponseVerdict",
    "aggregate",
    "aggregate_segments",
    "ascii_fold",
    "claim_tokens",
    "core_answer",
    "find_claims",
    "fold",
    "response_verdict",
    "sentences",
]


# ------------------------------------------------------------------ a growing text
# A word can only grow through these characters (``_WORD``'s inner class and its thousands
# comma): one with any other character after them is final however the text goes on.
_WORD_CONTINUATION = re.compile(r"[\w'’.\-,]*")
_NON_SPACE = re.compile(r"\S+")


class ClaimCutter:
    """:func:`find_claims` of a text that only grows, each run cut once it has closed.

    A stream's answer grows token by token and is judged at every step: cutting the whole
    text again each time made one step's work grow with the answer. The cutter keeps what
    is settled: the words that can no longer change (followed by a character no word goes
    on through), the runs they have closed, and the claims of those runs (``fixed``, only
    ever appended to). :meth:`claims` cuts only the still-open tail again. The short answer
    (:func:`_short_answer`) reads only the first line: claims stay in the tail until it is
    decided (the first line ended, or grew past what a short answer can have) and every run
    of the first line has closed, so ``fixed`` is never inserted into. Results equal
    :func:`find_claims` of the text so far; ``cuts`` counts runs judged (for tests that pin
    the work per step)."""

    def __init__(self, prompt: str = "") -> None:
        self.prompt = prompt
        self.seen = _prompt_words(prompt) if prompt else set()
        self.fixed: list[Claim] = []
        self._pending: list[Claim] = []  # claims of closed runs, held back until the answer
        self._builder = _RunBuilder()  # after the last final word
        self._scan = 0  # final words end at or before this
        self._end = 0  # the longest text seen: a shorter one cannot be cut from here
        self._newline: int | None = None  # the first "\n" once seen
        self._newline_from = 0
        self._answer_decided = False
        self._answer: tuple[int, int] | None = None
        self._placed = False  # the answer is among the claims (or there is none): no holding
        self._first_words = 0  # whitespace-separated words of the text scanned so far
        self._words_from = 0
        self.cuts = 0

    def can_cut(self, end: int) -> bool:
        """Whether ``text[:end]`` can be cut from the state kept (it is not shorter)."""
        return end >= self._end

    def claims(self, text: str, end: int) -> tuple[int, list[Claim]]:
        """The claims of ``text[:end]``: ``fixed[:n]`` then the returned tail, as
        ``(n, tail)``. ``text[:end]`` must extend every text given before."""
        if not self.can_cut(end):
            raise ValueError("the text may only grow")
        self._end = end
        seen = self.seen
        # Words followed by a character they cannot go on through are final.
        tail_words: list[tuple[int, int]] = []
        for m in _WORD.finditer(text, self._scan, end):
            s, e = m.span()
            go_on = _WORD_CONTINUATION.match(text, e, end)
            if tail_words or go_on is None or go_on.end() >= end:
                tail_words.append((s, e))
                continue
            closed = self._builder.feed(text, s, e)
            self._scan = e
            if closed is not None:
                self.cuts += 1
                claim = _run_claim(text, closed, seen)
                if claim is not None:
                    self._pending.append(claim)
        self._decide_answer(text, end)
        if not self._placed and self._answer_decided and self._first_line_closed():
            # Every claim of the first line is known: the answer goes in among them, once.
            if self._answer is not None:
                placed = _answer_claim(text, self._answer, seen, self._pending)
                if placed is not None:
                    self._pending.insert(*placed)
                self._answer = None
            self._placed = True
        if self._placed:
            self.fixed.extend(self._pending)
            self._pending = []
        # The tail: the open run and the words that may still change, cut again.
        builder = self._builder.copy()
        tail = list(self._pending)
        for s, e in tail_words:
            closed = builder.feed(text, s, e)
            if closed is not None:
                self.cuts += 1
                claim = _run_claim(text, closed, seen)
                if claim is not None:
                    tail.append(claim)
        last = builder.close()
        if last is not None:
            self.cuts += 1
            claim = _run_claim(text, last, seen)
            if claim is not None:
                tail.append(claim)
        answer = self._answer if self._answer_decided else (
            _short_answer(text[:end], self.prompt))
        if answer is not None:
            placed = _answer_claim(text, answer, seen, tail)
            if placed is not None:
                tail.insert(*placed)
        return len(self.fixed), tail

    def frontier(self) -> int:
        """No claim but the fixed ones can start before this, however the text goes on: a
        sentence that ends by here has all its claims fixed."""
        if not self._placed:
            return 0  # the short answer may still land anywhere in the first line
        run = self._builder.run
        return min(run[0][0], self._scan) if run else self._scan

    def _first_line_closed(self) -> bool:
        """Every run of the first line has closed (or the answer no longer matters)."""
        if self._newline is None:
            return True  # decided without a newline: no answer, nothing to place
        return self._scan > self._newline and not any(
            s < self._newline for s, _ in self._builder.run + self._builder.pending)

    def _decide_answer(self, text: str, end: int) -> None:
        """Settle the short answer once the first line can no longer change it."""
        if self._answer_decided:
            return
        if self._newline is None:
            nl = text.find("\n", self._newline_from, end)
            self._newline_from = end
            if nl >= 0:
                self._newline = nl
        if self._newline is not None:
            self._answer = _short_answer(text[:self._newline], self.prompt)
            self._answer_decided = True
            return
        # Still one line: past 3 * MAX_ANSWER_WORDS words it is no short answer, ever.
        growing = 0
        for m in _NON_SPACE.finditer(text, self._words_from, end):
            if m.end() == end:  # may still grow: counted for good once a space follows
                growing = 1
                break
            self._first_words += 1
            self._words_from = m.end()
        if self._first_words + growing > 3 * MAX_ANSWER_WORDS:
            self._answer_decided = True
            self._answer = None


class SentenceCutter:
    """:func:`sentences` of a text that only grows: a sentence ended by a newline, or by
    ``.``, ``!`` or ``?`` with a space after, is final (``fixed``); only the rest is cut
    again. ``cuts`` counts sentences cut."""

    def __init__(self) -> None:
        self.fixed: list[tuple[int, int]] = []
        self._scan = 0
        self._end = 0
        self.cuts = 0

    def can_cut(self, end: int) -> bool:
        return end >= self._end

    def sentences(self, text: str, end: int) -> tuple[int, list[tuple[int, int]]]:
        """The sentences of ``text[:end]``: ``fixed[:n]`` then the returned tail."""
        if not self.can_cut(end):
            raise ValueError("the text may only grow")
        self._end = end
        tail: list[tuple[int, int]] = []
        for m in _SENTENCE.finditer(text, self._scan, end):
            self.cuts += 1
            s, e = m.span()
            newline = text[e - 1] == "\n"
            span = (s, e - (1 if newline else 0))
            if not tail and (newline or (e < end and text[e].isspace()
                                         and text[e - 1] in ".!?")):
                self.fixed.append(span)
                self._scan = e
            else:
                tail.append(span)
        return len(self.fixed), tail
