"""Chemical elements: symbol, atomic number, name from symbol, discoverer (mendeleev's database)."""

from __future__ import annotations

import re

from probes.datasets.countries import ascii_fold
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import element_rows

DOMAIN = "chemistry"
_SPELLINGS = {"Aluminum": ["Aluminium"], "Sulfur": ["Sulphur"], "Cesium": ["Caesium"]}
_SHOT_ELEMENTS = {"Oxygen", "Sodium", "Gold", "Carbon", "Helium", "Iron"}

SHOTS = {
    "element_symbol": [
        ("What is the chemical symbol of Oxygen?", "O"),
        ("What is the chemical symbol of Sodium?", "Na"),
        ("What is the chemical symbol of Gold?", "Au"),
    ],
    "element_number": [
        ("What is the atomic number of Carbon?", "6"),
        ("What is the atomic number of Oxygen?", "8"),
        ("What is the atomic number of Iron?", "26"),
    ],
    "element_from_symbol": [
        ("Which chemical element has the symbol He?", "Helium"),
        ("Which chemical element has the symbol Na?", "Sodium"),
        ("Which chemical element has the symbol Fe?", "Iron"),
    ],
    "element_discoverer": [
        ("Who discovered the chemical element Oxygen?", "Joseph Priestley"),
        ("Who discovered the chemical element Helium?", "Pierre Janssen"),
        ("Who discovered the chemical element Sodium?", "Humphry Davy"),
    ],
}

PHRASINGS = {
    "element_symbol": ("What is the chemical symbol of {name}?",
                       "Which symbol stands for the element {name}?",
                       "Give the chemical symbol for {name}."),
    "element_number": ("What is the atomic number of {name}?",
                       "How many protons does an atom of {name} have?",
                       "Give the atomic number of {name}."),
    "element_from_symbol": ("Which chemical element has the symbol {name}?",
                            "The chemical symbol {name} stands for which element?",
                            "Name the element whose symbol is {name}."),
    "element_discoverer": ("Who discovered the chemical element {name}?",
                           "Which scientist discovered {name}?",
                           "Name the discoverer of the element {name}."),
}

# Discoverer strings that name institutions or nobody in particular.
_NOT_A_PERSON = re.compile(
    r"ancient|known|laborator|institut|universit|research|centre|center|society|team|"
    r"nuclear|GSI|JINR|RIKEN|\bLBL\b|\bLLNL\b",
    re.IGNORECASE,
)


def shots(topic: str) -> list[Shot]:
    return [Shot(question=q, answer=a) for q, a in SHOTS[topic]]


def _names(name: str) -> list[str]:
    return [name, *_SPELLINGS.get(name, [])]


def _people(discoverers: str | None) -> list[str]:
    """``"Carlo Perrier, Émillo Segrè"`` -> ["Carlo Perrier", "Perrier", "Emillo Segre", ...]."""
    if not discoverers or _NOT_A_PERSON.search(discoverers):
        return []
    out: list[str] = []
    for person in re.split(r",|;|\band\b|&", discoverers):
        person = re.sub(r"\s+", " ", person.replace(".", ". ")).strip(" .")
        if not person:
            continue
        surname = re.sub(r"\b(Jr|Sr)\.?$", "", person).strip(" .").split(" ")[-1]
        for variant in (person, surname):
            for v in (variant, ascii_fold(variant)):
                if len(v) >= 3 and v not in out:
                    out.append(v)
    return out


def _q(topic: str, row: dict, question: str, answers: list[str], answer_type: str = "text"
       ) -> Question:
    return Question(
        id=f"{topic}:{row['atomic_number']}",
        topic=topic,
        domain=DOMAIN,
        entity=f"element:{row['atomic_number']}",
        subject=row["name"],
        question=question,
        answers=answers,
        answer_type=answer_type,  # type: ignore[arg-type]
        shots=shots(topic),
    )


def _rows() -> list[dict]:
    return [r for r in element_rows() if r["name"] not in _SHOT_ELEMENTS]


def build_element_symbol() -> list[Question]:
    return [
        _q("element_symbol", r, f"What is the chemical symbol of {r['name']}?", [r["symbol"]],
           "symbol")
        for r in _rows()
    ]


def build_element_number() -> list[Question]:
    return [
        _q("element_number", r, f"What is the atomic number of {r['name']}?",
           [str(r["atomic_number"])], "number")
        for r in _rows()
    ]


def build_element_from_symbol() -> list[Question]:
    return [
        _q("element_from_symbol", r, f"Which chemical element has the symbol {r['symbol']}?",
           _names(r["name"]))
        for r in _rows()
    ]


def build_element_discoverer() -> list[Question]:
    out = []
    for r in _rows():
        people = _people(r["discoverers"])
        if people:
            out.append(_q("element_discoverer", r,
                          f"Who discovered the chemical element {r['name']}?", people))
    return out


def known_names() -> set[str]:
    return {ascii_fold(n).casefold() for r in element_rows() for n in _names(r["name"])}


__all__ = [
    "build_element_discoverer",
    "build_element_from_symbol",
    "build_element_number",
    "build_element_symbol",
    "known_names",
]
