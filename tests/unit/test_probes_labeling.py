"""Labelling: answer extraction, normalisation, refusals, numbers, symbols, token mapping."""

from __future__ import annotations

import pytest

from probes.datasets.schema import Question
from probes.labeling import (
    contains_words,
    extract_answer,
    is_refusal,
    label_answer,
    normalize,
    token_span,
)


def q(answers: list[str], *, answer_type: str = "text", near: list[str] | None = None,
      invented: bool = False, subject: str = "Mongolia",
      question: str = "What is the capital of Mongolia?") -> Question:
    return Question(id="t:1", topic="t", domain="d", entity="e:1", subject=subject,
                    question=question, answers=[] if invented else answers,
                    near_misses=near or [], answer_type=answer_type,  # type: ignore[arg-type]
                    invented=invented)


CAPITAL = q(["Ulaanbaatar", "Ulan Bator"])


@pytest.mark.parametrize("text, expected", [
    ("Ulaanbaatar", "ulaanbaatar"),
    ("  The Hague. ", "hague"),
    ("São Tomé", "sao tome"),
    ("N'Djamena", "ndjamena"),
    ("St. John's", "saint johns"),
    ("Trinidad & Tobago", "trinidad and tobago"),
])
def test_normalize(text: str, expected: str) -> None:
    assert normalize(text) == expected


def test_contains_words_matches_whole_words_only() -> None:
    assert contains_words("paris france", "paris")
    assert not contains_words("parisian", "paris")


@pytest.mark.parametrize("completion, answer", [
    (" Ulaanbaatar", "Ulaanbaatar"),
    (" Ulaanbaatar.\nQ: next", "Ulaanbaatar"),
    (" The capital of Mongolia is Ulaanbaatar.", "Ulaanbaatar"),
    (" Ulaanbaatar, the largest city", "Ulaanbaatar"),
    (" Ulaanbaatar (Mongolian: Улаанбаатар)", "Ulaanbaatar"),
    (" the Tugrik", "Tugrik"),
    (" St. Paul is a city", "St. Paul is a city"),  # "St." is not a sentence end
    (" Washington D.C. is the capital", "Washington D.C. is the capital"),
])
def test_extract_answer(completion: str, answer: str) -> None:
    span = extract_answer(completion, context="What is the capital of Mongolia? Mongolia")
    assert span is not None
    assert completion[span[0]:span[1]] == answer


def test_extract_answer_empty() -> None:
    assert extract_answer("   \nlater") is None
    assert extract_answer("") is None


@pytest.mark.parametrize("completion, label", [
    (" Ulaanbaatar", "retrieval"),
    (" ulan-bator", "retrieval"),
    (" The capital of Mongolia is Ulaanbaatar.", "retrieval"),
    (" Ulaanbaatar, Mongolia", "retrieval"),
    (" Samarkhand", "fabrication"),
    (" Beijing, China", "fabrication"),
    (" Mongolia", "fabrication"),  # repeating the country is a wrong answer
    (" Ulan", "ambiguous"),  # a fragment of an accepted answer
    (" I don't know.", "refusal"),
    (" There is no such country.", "refusal"),
    (" Unknown", "refusal"),
    ("", "ambiguous"),
    (" ...", "ambiguous"),
    (" It is a large landlocked country in east Asia between Russia and China", "ambiguous"),
])
def test_label_text_answers(completion: str, label: str) -> None:
    assert label_answer(CAPITAL, completion).label == label


def test_near_miss_is_ambiguous_but_a_wrong_qualifier_is_not() -> None:
    question = q(["Australian dollar", "AUD"], near=["Dollar"], subject="Australia",
                 question="What is the currency of Australia?")
    assert label_answer(question, " Dollar").label == "ambiguous"
    assert label_answer(question, " US dollar").label == "fabrication"
    assert label_answer(question, " The Australian Dollar (AUD)").label == "retrieval"


def test_numbers_and_symbols() -> None:
    number = q(["26"], answer_type="number", subject="Iron",
               question="What is the atomic number of Iron?")
    assert label_answer(number, " 26").label == "retrieval"
    assert label_answer(number, " The atomic number of iron is 26.").label == "retrieval"
    assert label_answer(number, " 56").label == "fabrication"
    assert label_answer(number, " iron").label == "ambiguous"
    symbol = q(["Fe"], answer_type="symbol", subject="Iron",
               question="What is the chemical symbol of Iron?")
    assert label_answer(symbol, " Fe").label == "retrieval"
    assert label_answer(symbol, " FE").label == "retrieval"
    assert label_answer(symbol, " F").label == "fabrication"


def test_invented_entities() -> None:
    fake = q([], invented=True, subject="Norvania", question="What is the capital of Norvania?")
    result = label_answer(fake, " Norvale City")
    assert result.label == "fabrication" and result.answer == "Norvale City"
    assert label_answer(fake, " I'm not sure.").label == "refusal"


@pytest.mark.parametrize("text", ["I do not know", "Sorry, I can't answer that",
                                  "That country does not exist", "N/A", "None"])
def test_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", ["Nonetheless Paris", "Knowles", "Paris"])
def test_not_refusals(text: str) -> None:
    assert not is_refusal(text)


def test_label_keeps_character_offsets() -> None:
    completion = " The capital of Mongolia is Ulaanbaatar."
    result = label_answer(CAPITAL, completion)
    assert result.span is not None
    assert completion[result.span[0]:result.span[1]] == result.answer == "Ulaanbaatar"


def test_token_span_maps_characters_to_tokens() -> None:
    # tokens: " The" " capital" " is" " Ul" "aan" "baatar" "." "\n"(stop, past the text)
    text = " The capital is Ulaanbaatar."
    offsets = [0, 4, 12, 15, 18, 21, 27, 28]
    assert token_span(offsets, (16, 27), len(text)) == (3, 6)
    assert token_span(offsets, (1, 4), len(text)) == (0, 1)
    assert token_span(offsets, (27, 28), len(text)) == (6, 7)
    assert token_span([0, 5], (28, 30), 5) is None


def test_token_span_is_the_sidecars_claim_tokens() -> None:
    """One rule for "which tokens a span covers": training's token_span is claim_tokens on
    the token ranges vLLM's text_offset gives."""
    from detector.claims import claim_tokens
    from probes.labeling import token_offsets

    text = " The capital is Ulaanbaatar."
    offsets = [0, 4, 12, 15, 18, 21, 27, 28]
    starts, ends = token_offsets(offsets, len(text))
    assert ends == [4, 12, 15, 18, 21, 27, 28, 28]  # the stop token past the text is empty
    for a in range(len(text) + 2):
        for b in range(a + 1, len(text) + 3):
            assert token_span(offsets, (a, b), len(text)) == claim_tokens(starts, ends, (a, b))
