"""Claim spans (detector.claims): what training labels, evaluation scores and the sidecar
judges; and the sidecar's verdicts derived from them (detector.sidecar.spans)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detector.claims import (
    aggregate,
    aggregate_segments,
    claim_tokens,
    core_answer,
    find_claims,
    response_verdict,
)
from detector.sidecar.spans import find_spans, judge_spans
from detector.sidecar.text import DecodedText
from probes.labeling import claim_for_answer


def claims(text: str, prompt: str = "") -> list[str]:
    return [c.text for c in find_claims(text, prompt=prompt)]


def test_function_words_and_pronouns_are_not_claims() -> None:
    text = " The capital is Paris. He said It was In 1990. They moved."
    assert claims(text) == ["Paris", "1990"]
    assert claims(" The") == [] and claims(" He") == []


def test_names_copied_from_the_prompt_are_not_claims() -> None:
    prompt = "What is the capital of France?"
    assert claims(" The capital of France is Paris.", prompt) == ["Paris"]
    assert claims(" France", prompt) == []
    # Only when every word is copied: a new name that shares a word is still a claim.
    assert claims(" New France", "Where is France?") == ["New France"]


def test_numbers_and_dates() -> None:
    found = find_claims(" It has 1,000 people, pi is 3.14, and it began on July 4, 1776 "
                        "or in the 1990s.")
    assert [(c.text, c.kind) for c in found] == [
        ("1,000", "number"), ("3.14", "number"), ("July 4, 1776", "date"), ("1990s", "number")]
    assert claims(" 26") == ["26"]
    assert claims(" She won 3 medals in 2004 and 2008.") == ["3", "2004", "2008"]


def test_multi_word_names_join_across_connectors() -> None:
    assert claims(" He lived in Rio de Janeiro, then the Gulf of the Lions.") == [
        "Rio de Janeiro", "Gulf of the Lions"]
    # "and" separates claims: each is judged on its own.
    assert claims(" Paris and London") == ["Paris", "London"]
    assert claims(" The University of Oxford and the Nile") == ["University of Oxford", "Nile"]
    # A connector never ends a name, and lines never join.
    assert claims(" Lima and\nQ: Peru") == ["Lima", "Q: Peru"[3:]]


def test_unicode_names() -> None:
    assert claims(" Zürich is near Genève and Ñuñoa; São Tomé too.") == [
        "Zürich", "Genève", "Ñuñoa", "São Tomé"]


def test_short_answer_core_is_a_claim_even_lowercase() -> None:
    prompt = "Q: What is the currency of Spain?\nA:"
    found = find_claims(" The currency of Spain is the euro.", prompt=prompt)
    assert [(c.text, c.kind) for c in found] == [("euro", "answer")]
    assert claims(" euro", prompt) == ["euro"]
    # Not in a long free-form answer, and never a function word alone.
    long = " It is a country in Europe where people pay with coins and notes every day."
    assert claims(long) == ["Europe"]
    assert claims(" it") == []


def test_core_answer_trims_restatements() -> None:
    text = " The capital of Mongolia is Ulaanbaatar."
    s, e = core_answer(text, context="What is the capital of Mongolia?")
    assert text[s:e] == "Ulaanbaatar"
    text = " Washington D.C. is the capital"
    s, e = core_answer(text, context="capital of the United States")
    assert text[s:e] == "Washington D.C. is the capital"


def test_claim_tokens_matches_the_overlap_rule_on_any_token_layout() -> None:
    """The binary search finds exactly the tokens that overlap a claim, with empty tokens
    (special tokens, a stop token past the text) and gaps anywhere, a claim inside one token, and
    claims reaching past the text."""
    rng = np.random.default_rng(7)
    for _ in range(300):
        lengths = rng.choice([0, 0, 1, 2, 3, 5], size=int(rng.integers(0, 25)))
        gaps = rng.choice([0, 0, 0, 1, 2], size=lengths.size)  # text no token produced
        ends = np.cumsum(lengths + gaps).tolist()
        starts = [e - n for e, n in zip(ends, lengths.tolist())]
        total = ends[-1] if ends else 0
        for _ in range(20):
            a = int(rng.integers(0, total + 3))
            b = a + int(rng.integers(1, 8))
            hits = [i for i, (s, e) in enumerate(zip(starts, ends)) if e > a and s < b and e > s]
            expected = (hits[0], hits[-1] + 1) if hits else None
            assert claim_tokens(starts, ends, (a, b)) == expected, (starts, ends, a, b)


def test_claim_for_answer_picks_the_claim_carrying_the_answer() -> None:
    text = " The capital of Mongolia is Ulan Bator, in Asia."
    claim = claim_for_answer(text, (27, 37), prompt="What is the capital of Mongolia?")
    assert claim is not None and claim.text == "Ulan Bator"
    assert claim_for_answer(" Mongolia", (1, 9), prompt="capital of Mongolia?") is None


def test_claim_tokens_and_aggregation() -> None:
    #            " The"  " capital"  " is"  " New"  " York" "."
    starts = [0, 4, 12, 15, 19, 24]
    ends = [4, 12, 15, 19, 24, 25]
    (claim,) = find_claims(" The capital is New York.")
    assert claim_tokens(starts, ends, claim) == (3, 5)
    assert claim_tokens(starts, ends, (25, 30)) is None
    assert aggregate([0.1, 0.7, 0.2]) == 0.7
    assert aggregate([0.1, 0.3], "mean") == pytest.approx(0.2)
    with pytest.raises(ValueError):
        aggregate([], "max")
    with pytest.raises(ValueError):
        aggregate([0.1], "median")
    seg = aggregate_segments(np.array([0.1, 0.9, 0.2, 0.4, 0.6]), np.array([2, 3]))
    assert seg.tolist() == [0.9, 0.6]
    seg = aggregate_segments(np.array([0.1, 0.9, 0.2, 0.4, 0.6]), np.array([2, 3]), "mean")
    assert seg.tolist() == pytest.approx([0.5, 0.4])


def test_response_verdict_is_any_claim_flagged() -> None:
    v = response_verdict("p", 0.5, [0.2, 0.7, 0.4])
    assert v.flagged and v.score == 0.7 and v.claims == 3 and v.flagged_claims == 1
    v = response_verdict("p", 0.5, [0.2])
    assert not v.flagged
    v = response_verdict("p", 0.5, [])
    assert not v.flagged and math.isnan(v.score) and v.claims == 0


def _decoded(pieces: list[str]) -> DecodedText:
    return DecodedText.from_pieces(pieces)


def test_sidecar_judges_claims_not_function_words() -> None:
    """The demo's first answer: a high score on "The" must not flag the correct "Paris"."""
    decoded = _decoded([" The", " capital", " of", " France", " is", " Paris", "."])
    scores = [{"p": s} for s in (0.97, 0.9, 0.9, 0.95, 0.9, 0.08, 0.9)]
    spans = find_spans(decoded, prompt="What is the capital of France?")
    assert [(s.text, s.token_start, s.token_end) for s in spans] == [("Paris", 5, 6)]
    verdicts, responses = judge_spans(decoded, spans, scores, [("p", "max", 0.81)])
    by_kind = {v.span.kind: v for v in verdicts}
    assert by_kind["claim"].score == pytest.approx(0.08) and not by_kind["claim"].flagged
    assert by_kind["sentence"].score == pytest.approx(0.08) and not by_kind["sentence"].flagged
    (response,) = responses
    assert not response.flagged and response.claims == 1


def test_sentence_and_response_verdicts_follow_their_claims() -> None:
    decoded = _decoded([" Paris", " is", " big", ".", " Rome", " is", " in", " Spain", "."])
    scores = [{"p": s} for s in (0.1, 0.99, 0.99, 0.99, 0.2, 0.99, 0.99, 0.9, 0.99)]
    spans = find_spans(decoded)
    verdicts, responses = judge_spans(decoded, spans, scores, [("p", "max", 0.5)])
    sentences = [v for v in verdicts if v.span.kind == "sentence"]
    assert [(v.span.text, v.flagged) for v in sentences] == [
        ("Paris is big.", False), ("Rome is in Spain.", True)]
    assert responses[0].flagged and responses[0].flagged_claims == 1
    # Only the requested kinds; unscored claims get no verdict.
    only, _ = judge_spans(decoded, spans, [{} for _ in scores], [("p", "max", 0.5)], ("claim",))
    assert only == []
