"""Long-form (multi-claim) training questions, labelled claim by claim against the KB."""

from __future__ import annotations

import pytest

from probes.datasets import heldout, longform
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.invented import build_invented
from probes.datasets.registry import LONGFORM_TOPICS, TOPICS, build_dataset
from probes.datasets.schema import Question
from probes.labeling import label_answer, label_claims


def _question(topic: str, subject: str) -> Question:
    return next(q for q in TOPICS[topic].build() if q.subject == subject)


def _labels(q: Question, completion: str) -> dict[str, str]:
    return {r.answer: r.label for r in label_claims(q, completion, prompt=q.question)}


def test_country_answer_is_labelled_claim_by_claim() -> None:
    peru = _question("longform_country", "Peru")
    assert peru.answer_type == "claims" and peru.max_tokens == longform.MAX_TOKENS
    assert set(peru.values) == {"capital", "currency", "language", "continent"}
    right = " Peru's capital is Lima and its official language is Spanish. It lies in South America."
    got = _labels(peru, right)
    assert {k: v for k, v in got.items() if v != "ambiguous"} == {
        "Lima": "retrieval", "Spanish": "retrieval", "South America": "retrieval"}
    wrong = (" The capital of Peru is Santiago, it pays with the Chilean Peso and people speak "
             "Portuguese.")
    got = _labels(peru, wrong)
    assert got["Santiago"] == "fabrication"  # Chile's capital
    assert got["Chilean Peso"] == "fabrication"  # Chile's currency
    assert got["Portuguese"] == "fabrication"  # Brazil's language
    spans = label_claims(peru, wrong, prompt=peru.question)
    assert all(wrong[r.span[0]:r.span[1]] == r.answer for r in spans)  # character offsets


def test_unknown_values_echoes_and_numbers_are_left_out() -> None:
    k = _question("longform_element", "Potassium")
    got = _labels(k, " Potassium has the symbol K and the atomic number 19, with 3 natural "
                     "isotopes; it was isolated by Humphry Davy in London.")
    assert got["K"] == "retrieval" and got["19"] == "retrieval"
    assert got["Humphry Davy"] == "retrieval"
    assert got["3"] == "ambiguous"  # another element's atomic number, yet no wrong claim
    assert got["London"] == "ambiguous"  # matches no known value
    assert "Potassium" not in got  # copied from the prompt: no claim
    wrong = _labels(k, " Potassium has the symbol Ir and was discovered by Marie Curie.")
    assert wrong == {"Ir": "fabrication", "Marie Curie": "fabrication"}


def test_invented_twin_every_claim_is_a_fabrication() -> None:
    q = build_invented(per_template=1, templates=["invented_longform_country"])[0]
    assert q.answer_type == "claims" and q.invented and not q.values
    got = _labels(q, f" {q.subject} is a small country whose capital is Port Elira; it uses "
                     "the Elirian Crown.")
    assert set(got.values()) == {"fabrication"} and "Port Elira" in got
    with pytest.raises(ValueError, match="label_claims"):
        label_answer(q, " Port Elira")


def test_longform_entities_follow_the_split_and_values_hold_no_heldout_fact() -> None:
    questions = build_dataset(["longform"])
    assert {q.topic for q in questions} == set(LONGFORM_TOPICS)
    assert not [q.id for q in questions if is_heldout_entity(q.entity)]
    for topic in longform.PROFILES:
        others = longform.other_values(topic)
        assert not [k for by in others.values() for k in by if is_heldout_entity(k)]
    # no held-out kind of fact is a value (discovery years, calling codes, neighbours)
    years = {str(r["discovery_year"]) for r in __import__(
        "probes.datasets.sources", fromlist=["element_rows"]).element_rows()
        if r["discovery_year"]}
    element_values = {v for q in questions if q.topic == "longform_element"
                      for v in q.answers}
    assert not (element_values & years) - {q.values["number"][0] for q in questions
                                           if q.topic == "longform_element"}
    wordings = {p for t in LONGFORM_TOPICS for p in TOPICS[t].phrasings}
    assert heldout.LONGFORM_PROMPT not in wordings


def test_announced_numbers_are_checked() -> None:
    cr = _question("longform_element", "Chromium")
    got = _labels(cr, " Chromium has the symbol Cr and an atomic number of 2; it has 4 "
                      "stable isotopes.")
    assert got == {"Cr": "retrieval", "2": "fabrication", "4": "ambiguous"}
    assert _labels(cr, " Chromium has atomic number 24.") == {"24": "retrieval"}
    nm = _question("longform_state", "New Mexico")
    got = _labels(nm, " Its postal abbreviation is NM and it became a state in 1898.")
    assert got == {"NM": "retrieval", "1898": "fabrication"}
    assert _labels(nm, " It became a state in 1912.") == {"1912": "retrieval"}


def test_language_profile_values() -> None:
    nauru = _question("longform_language", "Nauru") if any(
        q.subject == "Nauru" for q in TOPICS["longform_language"].build()) else None
    assert nauru is None  # its own name is its autonym: nothing to ask
    it = _question("longform_language", "Italian")
    assert it.values == {"autonym": ["italiano"], "script": ["Latin", "Roman"]}
    got = _labels(it, " Italian is written in the Roman alphabet; it uses Cyrillic in Ticino.")
    assert got["Roman"] == "retrieval" and got["Cyrillic"] == "fabrication"
