"""US states: capital, postal abbreviation and year of statehood (the ``us`` package)."""

from __future__ import annotations

from probes.datasets.schema import Question, Shot
from probes.datasets.sources import import_package

DOMAIN = "us_states"
_SHOT_STATES = {"California", "Texas", "Florida", "Ohio"}

SHOTS = {
    "state_capital": [
        ("What is the capital of the US state of California?", "Sacramento"),
        ("What is the capital of the US state of Texas?", "Austin"),
        ("What is the capital of the US state of Florida?", "Tallahassee"),
    ],
    "state_abbreviation": [
        ("What is the postal abbreviation of the US state of California?", "CA"),
        ("What is the postal abbreviation of the US state of Texas?", "TX"),
        ("What is the postal abbreviation of the US state of Ohio?", "OH"),
    ],
    "state_statehood": [
        ("In what year did California become a US state?", "1850"),
        ("In what year did Texas become a US state?", "1845"),
        ("In what year did Ohio become a US state?", "1803"),
    ],
}

PHRASINGS = {
    "state_capital": ("What is the capital of the US state of {name}?",
                      "Which city is the state capital of {name}?",
                      "Name the capital city of the US state of {name}."),
    "state_abbreviation": ("What is the postal abbreviation of the US state of {name}?",
                           "Which two-letter postal code stands for {name}?",
                           "Give the USPS abbreviation of {name}."),
    "state_statehood": ("In what year did {name} become a US state?",
                        "{name} was admitted to the Union in which year?",
                        "Give the year {name} joined the United States."),
}


def shots(topic: str) -> list[Shot]:
    return [Shot(question=q, answer=a) for q, a in SHOTS[topic]]


def _states() -> list:
    us = import_package("us")
    return [s for s in us.STATES if s.name not in _SHOT_STATES]


def _q(topic: str, state, question: str, answers: list[str], answer_type: str = "text"
       ) -> Question:
    return Question(
        id=f"{topic}:{state.abbr}",
        topic=topic,
        domain=DOMAIN,
        entity=f"state:{state.abbr}",
        subject=state.name,
        question=question,
        answers=answers,
        answer_type=answer_type,  # type: ignore[arg-type]
        shots=shots(topic),
    )


def build_state_capital() -> list[Question]:
    out = []
    for s in _states():
        answers = [s.capital] + (["St. Paul"] if s.capital == "Saint Paul" else [])
        out.append(_q("state_capital", s,
                      f"What is the capital of the US state of {s.name}?", answers))
    return out


def build_state_abbreviation() -> list[Question]:
    return [
        _q("state_abbreviation", s,
           f"What is the postal abbreviation of the US state of {s.name}?", [s.abbr], "symbol")
        for s in _states()
    ]


def build_state_statehood() -> list[Question]:
    return [
        _q("state_statehood", s, f"In what year did {s.name} become a US state?",
           [str(s.statehood_year)], "number")
        for s in _states()
        if s.statehood_year
    ]


def known_names() -> set[str]:
    us = import_package("us")
    return {s.name.casefold() for s in us.STATES} | {s.capital.casefold() for s in us.STATES}


__all__ = ["build_state_abbreviation", "build_state_capital", "build_state_statehood",
           "known_names"]
