"""Label a model's answer: retrieval, fabrication, refusal or ambiguous.

The answer span is the core claim of the first line of the completion ("Ulaanbaatar" in
" The capital of Mongolia is Ulaanbaatar."): leading restatements, articles, trailing
clauses and punctuation are trimmed, and the span keeps its character offsets so it can
be mapped onto the generated tokens. Then, after normalisation (accents, case,
punctuation, articles, "St." = "Saint"):

* **retrieval**: the answer equals an accepted answer or contains one as whole words;
* **refusal**: the model declines ("I don't know", "there is no such country"); left out;
* **ambiguous**: no answer, a long description instead of a short answer, a near miss
  ("Dollar" for the Australian dollar), a fragment of an accepted answer ("New" for
  "New Delhi"), a correct answer outside the extracted span, or an answer cut off by
  ``max_tokens`` (marked by the capture); left out;
* **fabrication**: anything else, i.e. a confident wrong answer. Every substantive answer
  about an invented entity is a fabrication.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from detector.claims import (
    MAX_ANSWER_WORDS,
    Claim,
    ascii_fold,
    claim_tokens,
    core_answer,
    find_claims,
)
from probes.datasets.schema import Question

Label = Literal["retrieval", "fabrication", "refusal", "ambiguous"]
TRAINABLE: tuple[Label, ...] = ("retrieval", "fabrication")

_WORD_SUBSTITUTIONS = {"st": "saint", "ste": "sainte", "mt": "mount", "ft": "fort"}
_ARTICLES = ("the ", "a ", "an ")
_REFUSALS = [
    "i dont know", "i do not know", "dont know", "not sure", "no idea", "unknown",
    "no such", "does not exist", "doesnt exist", "do not exist", "dont exist", "not exist",
    "not a real", "fictional", "fictitious", "imaginary", "made up", "there is no",
    "there are no", "i cannot", "i cant", "im sorry", "i am sorry", "sorry",
    "not applicable", "n a", "no information", "not aware", "no capital", "no currency",
    "no official", "not a country", "not a state", "not an element", "not a city",
    "no known", "cannot be determined", "unclear", "not available", "none",
    "i am not able", "im not able", "unable to", "not known", "no answer",
]  # fmt: skip
_REFUSAL_RE = re.compile(r"(?:^| )(?:" + "|".join(re.escape(r) for r in _REFUSALS) + r")(?: |$)")


class AnswerLabel(BaseModel):
    """The outcome of labelling one completion."""

    model_config = ConfigDict(frozen=True)

    label: Label
    reason: str
    span: tuple[int, int] | None = None  # characters of the answer in the completion
    answer: str = ""
    matched: str | None = None  # the accepted answer it matched


def normalize(text: str) -> str:
    """Accent-, case- and punctuation-insensitive form used for every comparison."""
    text = ascii_fold(text).lower().replace("&", " and ")
    text = re.sub(r"['`\u2019]", "", text)
    text = re.sub(r"[^a-z0-9]+", " ", text).strip()
    words = [_WORD_SUBSTITUTIONS.get(w, w) for w in text.split()]
    text = " ".join(words)
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article):]
            break
    return text


def contains_words(haystack: str, needle: str) -> bool:
    """Whether normalised ``needle`` occurs in normalised ``haystack`` as whole words."""
    return bool(needle) and f" {needle} " in f" {haystack} "


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL_RE.search(normalize(text)))


def extract_answer(completion: str, *, context: str | None = None) -> tuple[int, int] | None:
    """Character span ``(start, end)`` of the core answer, or None when there is none.

    ``context`` (the question) tells a restatement ("The capital of Mongolia is X") from an
    answer that merely contains "is" ("Washington D.C. is the capital"). The rule lives in
    :func:`detector.claims.core_answer`, the claim notion serving shares.
    """
    return core_answer(completion, context=context)


def claim_for_answer(completion: str, answer: tuple[int, int], *, prompt: str = ""
                     ) -> Claim | None:
    """The claim span (:func:`detector.claims.find_claims`) that carries the labelled answer:
    what training labels and the sidecar judges. The claim overlapping the answer most wins;
    None when no claim overlaps it (the answer is then left out of training)."""
    best, overlap = None, 0
    for claim in find_claims(completion, prompt=prompt):
        k = min(claim.end, answer[1]) - max(claim.start, answer[0])
        if k > overlap:
            best, overlap = claim, k
    return best


def _numbers(text: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", text)]


# A number with its sign and fraction ("UTC-8", "+5:30", "1.5"): what :func:`normalize`
# erases, so "UTC-8" would equal "UTC+8" and "1.5" would contain "1".
_SIGNED_NUMBER = re.compile(
    r"(?<![\d.:,])([+\-\u2212]?)(\d{1,3}(?:,\d{3})+|\d+(?:[.:]\d+)?)(?!\d|[.:,]\d)")


def _signed_numbers(text: str) -> list[tuple[str, float]]:
    """``(sign, value)`` of each number: sign ``""`` when the text writes none; ``h:mm``
    read as hours."""
    out = []
    for sign, digits in _SIGNED_NUMBER.findall(text):
        if ":" in digits:
            h, m = digits.split(":")
            value = int(h) + int(m) / 60.0
        else:
            value = float(digits.replace(",", ""))
        out.append(("-" if sign in ("-", "\u2212") else sign, value))
    return out


def numbers_agree(answer: str, alias: str) -> bool:
    """Whether every number of an accepted answer appears in the answer with the same value
    and, where both write one, the same sign: the check that normalised matching loses."""
    mine = _signed_numbers(answer)
    for sign, value in _signed_numbers(alias):
        if not any(v == value and (not sign or not s or s == sign) for s, v in mine):
            return False
    return True


ClaimLabel = Literal["retrieval", "fabrication", "unlabelled", "echo"]


def _matches(claim: str, claim_norm: str, value: str) -> bool:
    v = normalize(value)
    if not v:
        return False
    if value.isupper() and len(value) <= 3:  # a currency code: only as written, whole
        return claim.strip() == value
    return (claim_norm == v or contains_words(claim_norm, v)) and numbers_agree(claim, value)


def is_echo(claim: str, subject: str, prompt: str) -> bool:
    """A claim that only repeats the prompt or the subject's own name (or a word formed
    from it, "Norvanian"): no claim of the model's."""
    words = normalize(claim).split()
    if not words:
        return True
    seen = set(normalize(prompt).split())
    stem = normalize(subject).replace(" ", "")[:-2] if len(subject) > 4 else normalize(subject)
    return all(w in seen or (stem and w.startswith(stem)) for w in words)


def label_longform_claim(claim: str, *, subject: str, invented: bool,
                         values: Mapping[str, Sequence[str]],
                         other_values: Mapping[str, Mapping[str, Sequence[str]]],
                         prompt: str, entity_key: str = "") -> tuple[ClaimLabel, str]:
    """Label one claim span of a long-form answer about a country; returns (label, why).

    Real subject: ``retrieval`` if the claim matches one of the subject's true values (any
    attribute), ``fabrication`` if it matches another country's value of an attribute and
    none of the subject's, else ``unlabelled``. Invented subject: every claim that is not an
    ``echo`` of the prompt is a fabrication.
    """
    norm = normalize(claim)
    if not invented:  # a true value first: "Albanian" is a language, not an echo of Albania
        for attr, vals in values.items():
            for v in vals:
                if _matches(claim, norm, v):
                    return "retrieval", f"{attr} {v!r}"
    if is_echo(claim, subject, prompt):
        return "echo", "repeats the prompt or the subject's name"
    if invented:
        return "fabrication", "a claim about an invented country"
    if not norm:
        return "unlabelled", "no words"
    for attr, by_entity in other_values.items():
        for key, vals in by_entity.items():
            if key == entity_key:
                continue
            for v in vals:
                if _matches(claim, norm, v):
                    return "fabrication", f"{attr} of {key}: {v!r}"
    return "unlabelled", "matches no known value"


def label_claims(question: Question, completion: str, *, prompt: str) -> list[AnswerLabel]:
    """One label per claim span (:func:`detector.claims.find_claims` with the ``prompt`` the
    model read) of a long-form answer (``answer_type == "claims"``).

    The rule is the held-out long form's
    (:func:`label_longform_claim`) against ``question.values`` and
    the other entities' values of the topic's contrast attributes
    (:func:`probes.datasets.longform.other_values`), plus numbers a cue announces
    ("atomic number of 2", :func:`probes.datasets.longform.contradicted_number`):
    retrieval, fabrication, or ambiguous (an echo of the prompt, or a claim matching no
    known value), left out of training.
    """
    from probes.datasets.longform import contradicted_number, other_values

    if question.answer_type != "claims":
        raise ValueError(f"question {question.id!r} is not a long-form question")
    others = {} if question.invented else other_values(question.topic.removeprefix(
        "invented_"))
    out = []
    for claim in find_claims(completion, prompt=prompt):
        label, why = label_longform_claim(
            claim.text, subject=question.subject, invented=question.invented,
            values=question.values, other_values=others, prompt=question.question,
            entity_key=question.entity)
        if label == "unlabelled" and not question.invented:
            wrong = contradicted_number(question, completion, claim.start, claim.text)
            if wrong:
                label, why = "fabrication", wrong
        out.append(AnswerLabel(
            label=label if label in TRAINABLE else "ambiguous",
            reason=why if label in TRAINABLE else f"{label}: {why}",
            span=(claim.start, claim.end), answer=claim.text))
    return out


def label_answer(question: Question, completion: str) -> AnswerLabel:
    """Label one completion of ``question`` (see the module docstring for the rules)."""
    if question.answer_type == "claims":
        raise ValueError(f"question {question.id!r} is long-form: label it with label_claims")
    first_line = completion.split("\n", 1)[0]
    span = extract_answer(completion, context=f"{question.question} {question.subject}")
    if is_refusal(first_line):
        return AnswerLabel(label="refusal", reason="declined to answer", span=span,
                           answer=completion[span[0]:span[1]] if span else "")
    if span is None:
        return AnswerLabel(label="ambiguous", reason="empty answer")
    answer = completion[span[0]:span[1]]

    def out(label: Label, reason: str, matched: str | None = None) -> AnswerLabel:
        return AnswerLabel(label=label, reason=reason, span=span, answer=answer, matched=matched)

    if not re.search(r"[A-Za-z0-9]", answer):
        return out("ambiguous", "no letters or digits")
    if len(answer.split()) > MAX_ANSWER_WORDS:
        return out("ambiguous", f"not a short answer (> {MAX_ANSWER_WORDS} words)")
    if question.invented:
        return out("fabrication", "answered about an invented entity")

    if question.answer_type == "number":
        numbers = _numbers(answer)
        if not numbers:
            return out("ambiguous", "no number in the answer")
        gold = {int(a) for a in question.answers if a.strip().isdigit()}
        if numbers[0] in gold:
            return out("retrieval", "number matches", str(numbers[0]))
        return out("fabrication", f"number {numbers[0]} is not {sorted(gold)}")

    norm = normalize(answer)
    aliases = {normalize(a): a for a in question.answers}
    aliases.pop("", None)
    if question.answer_type == "symbol":
        head = norm.split(" ")[0] if norm else ""
        if head in aliases:
            return out("retrieval", "symbol matches", aliases[head])
        return out("fabrication", f"{head!r} is not {sorted(aliases)}")

    if norm in aliases and numbers_agree(answer, aliases[norm]):
        return out("retrieval", "equals an accepted answer", aliases[norm])
    for alias_norm, alias in sorted(aliases.items(), key=lambda kv: -len(kv[0])):
        if contains_words(norm, alias_norm) and numbers_agree(answer, alias):
            return out("retrieval", "contains an accepted answer", alias)
    for near in question.near_misses:
        near_norm = normalize(near)
        if near_norm and norm == near_norm:
            return out("ambiguous", f"near miss {near!r}")
    if norm != normalize(question.subject) and any(
        contains_words(alias_norm, norm) and numbers_agree(alias, answer)
        for alias_norm, alias in aliases.items()
    ):
        return out("ambiguous", "part of an accepted answer")
    line = normalize(first_line)
    if any(contains_words(line, alias_norm) and numbers_agree(first_line, alias)
           for alias_norm, alias in aliases.items()):
        return out("ambiguous", "an accepted answer appears outside the extracted span")
    return out("fabrication", "matches no accepted answer")


def token_offsets(text_offsets: Sequence[int], text_length: int) -> tuple[list[int], list[int]]:
    """Character ``(starts, ends)`` of generated tokens from vLLM's ``text_offset``.

    ``text_offsets[i]`` is where token i starts in the completion; a token ends where the
    next begins, and nothing reaches past the text: tokens past it (the stop token) get
    empty ranges, which overlap nothing.
    """
    starts = [int(b) for b in text_offsets]
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError("text offsets must be non-decreasing (vLLM's are running sums)")
    n = len(starts)
    ends = [min(starts[i + 1] if i + 1 < n else max(starts[i], text_length), text_length)
            for i in range(n)]
    return starts, ends


def token_span(text_offsets: Sequence[int], span: tuple[int, int], text_length: int
               ) -> tuple[int, int] | None:
    """Generated tokens ``[t0, t1)`` that overlap the character span, or None.

    The rule is :func:`detector.claims.claim_tokens` (the sidecar's), applied to the token
    ranges :func:`token_offsets` derives from vLLM's ``text_offset``: one implementation
    of "which tokens a claim covers" for training and serving.
    """
    starts, ends = token_offsets(text_offsets, text_length)
    return claim_tokens(starts, ends, (int(span[0]), int(span[1])))


__all__ = [
    "TRAINABLE",
    "AnswerLabel",
    "ClaimLabel",
    "claim_for_answer",
    "Label",
    "contains_words",
    "extract_answer",
    "is_echo",
    "is_refusal",
    "label_answer",
    "label_claims",
    "label_longform_claim",
    "normalize",
    "numbers_agree",
    "token_offsets",
    "token_span",
]
