"""Multi-claim answers for training: a few sentences about an entity of a training topic.

The model is asked for a short profile ("Describe Peru in two sentences, naming its
capital, currency, official language and continent.") and every claim span of its answer
(:func:`detector.claims.find_claims`, what the sidecar judges) is labelled against the
knowledge base by :func:`probes.labeling.label_claims`, with the rule the held-out long
form uses (:func:`probes.labeling.label_longform_claim`): a claim matching one of
the entity's true values is a retrieval, one matching another entity's value of a
*contrast* attribute (and none of its own) a fabrication, anything else is left out; every
non-echo claim about an invented entity is a fabrication.

Entities are those of the training topics (countries, US states, elements, languages),
split by the same entity key, so held-out entities drop out in the registry; the values
never include a held-out kind of fact (no neighbours, calling codes, discovery years).
The wording differs from the held-out long-form prompt (``heldout.LONGFORM_PROMPT``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
import re
from dataclasses import dataclass, field

from probes.datasets import countries, elements, languages, us_states
from probes.datasets.facts import unique
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import element_rows, import_package

MAX_TOKENS = 80


@dataclass(frozen=True)
class Profile:
    """One long-form topic: whose values it asks for and how."""

    topic: str
    domain: str
    attributes: tuple[str, ...]
    # Attributes whose values, when they belong to another entity, mark a claim as
    # fabricated ("Lima" about Chile). Numbers are left out: "2" is someone's atomic
    # number, yet "2 isotopes" says nothing wrong.
    contrast: tuple[str, ...]
    entities: Callable[[], Iterable[tuple[str, str, dict[str, list[str]]]]]  # key, name, values
    shot_sentence: str  # a shot's answer, from the shot entity's first value per attribute
    shot_entities: tuple[str, ...]
    # attribute -> words that announce its number ("atomic number" 26): a number claim
    # right after them that is not the entity's value is a fabrication.
    cues: dict[str, str] = field(default_factory=dict)


def _countries() -> Iterable[tuple[str, str, dict[str, list[str]]]]:
    for iso, c in sorted(countries.countries().items()):
        values = countries.country_values(c)
        if c.continent in countries.CONTINENTS and c.continent != "AN":
            values["continent"] = [countries.CONTINENTS[c.continent]]
        yield f"country:{iso}", c.name, values


def _states() -> Iterable[tuple[str, str, dict[str, list[str]]]]:
    for s in import_package("us").STATES:
        capital = [s.capital] + (["St. Paul"] if s.capital == "Saint Paul" else [])
        yield f"state:{s.abbr}", s.name, {"capital": capital, "abbreviation": [s.abbr],
                                          "statehood": [str(s.statehood_year or "")]}


def _elements() -> Iterable[tuple[str, str, dict[str, list[str]]]]:
    for r in element_rows():
        yield f"element:{r['atomic_number']}", r["name"], {
            "symbol": [r["symbol"]], "number": [str(r["atomic_number"])],
            "discoverer": elements._people(r["discoverers"])}


def _languages() -> Iterable[tuple[str, str, dict[str, list[str]]]]:
    """Script and own name (when it differs from the English one: "Nauru" about Nauru
    would match any claim naming the island). ISO codes are lowercase: never a claim."""
    for code, lang in sorted(languages.languages().items()):
        if lang.speakers < languages.MIN_SPEAKERS:
            continue
        script = [lang.script, *languages._SCRIPT_ALIASES.get(lang.script, [])] \
            if lang.script else []
        autonym = [] if lang.autonym.casefold() in {n.casefold() for n in lang.names} \
            else [lang.autonym]
        yield f"language:{code}", lang.name, {"script": script, "autonym": autonym}


PROFILES: dict[str, Profile] = {p.topic: p for p in [
    Profile("longform_country", "geography", ("capital", "currency", "language", "continent"),
            ("capital", "currency", "language"), _countries,
            "The capital of {name} is {capital}, it pays with the {currency}, its official "
            "language is {language} and it lies in {continent}.", ("country:FR", "country:JP")),
    Profile("longform_state", "us_states", ("capital", "abbreviation", "statehood"),
            ("capital", "statehood"), _states,
            "The capital of {name} is {capital}, its postal abbreviation is {abbreviation} "
            "and it became a state in {statehood}.", ("state:CA", "state:TX"),
            {"statehood": r"(?:became a|joined the|admitted|statehood|a state)"}),
    Profile("longform_element", "chemistry", ("symbol", "number", "discoverer"),
            ("symbol", "discoverer"), _elements,
            "{name} has the symbol {symbol} and the atomic number {number}; it was "
            "discovered by {discoverer}.", ("element:8", "element:11"),
            {"number": r"atomic number"}),
    Profile("longform_language", "languages", ("autonym", "script"), ("script",), _languages,
            "Its speakers call {name} {autonym}, and it is written in the {script} script.",
            ("language:de", "language:sv")),
]}

PHRASINGS = {
    "longform_country": (
        "Describe {name} in two sentences, naming its capital, currency, official language "
        "and continent.",
        "Write a short profile of {name}: capital, currency, official language and continent.",
        "In a few sentences, what should a traveller know about the capital, currency, "
        "language and continent of {name}?"),
    "longform_state": (
        "Describe the US state of {name} in two sentences, with its capital, postal "
        "abbreviation and year of statehood.",
        "Write a short profile of the US state of {name}: capital, postal code and the year "
        "it joined the Union.",
        "In a few sentences, summarise the capital, abbreviation and statehood year of {name}."),
    "longform_element": (
        "Describe the chemical element {name} in two sentences, with its symbol, atomic "
        "number and discoverer.",
        "Write a short profile of the element {name}: symbol, atomic number and who "
        "discovered it.",
        "In a few sentences, summarise the symbol, atomic number and discoverer of {name}."),
    "longform_language": (
        "Describe the {name} language in two sentences, with its native name and its script.",
        "Write a short profile of the {name} language: what its speakers call it and how it "
        "is written.",
        "In a few sentences, summarise the native name and the writing system of {name}."),
}


@functools.lru_cache(maxsize=None)
def _table(topic: str) -> dict[str, tuple[str, dict[str, list[str]]]]:
    """entity -> (name, values with empty and repeated values dropped)."""
    return {key: (name, {a: unique(v) for a, v in values.items() if unique(v)})
            for key, name, values in PROFILES[topic].entities()}


@functools.lru_cache(maxsize=None)
def shots(topic: str) -> list[Shot]:
    """Worked examples about the profile's shot entities, their answers written from the
    knowledge base (first value of each attribute)."""
    profile, table = PROFILES[topic], _table(topic)
    out = []
    for key in profile.shot_entities:
        name, values = table[key]
        out.append(Shot(question=PHRASINGS[topic][0].format(name=name),
                        answer=profile.shot_sentence.format(
                            name=name, **{a: values[a][0] for a in profile.attributes})))
    return out


@functools.lru_cache(maxsize=None)
def other_values(topic: str) -> dict[str, dict[str, list[str]]]:
    """contrast attribute -> entity -> its values, over the entities that are not held
    out (a held-out entity's values stay out of training, labels included)."""
    profile = PROFILES[topic]
    out: dict[str, dict[str, list[str]]] = {a: {} for a in profile.contrast}
    for key, (_, values) in _table(topic).items():
        if is_heldout_entity(key):
            continue
        for attr in profile.contrast:
            if values.get(attr):
                out[attr][key] = values[attr]
    return out


def contradicted_number(question: Question, completion: str, start: int, claim: str
                        ) -> str | None:
    """Why the number ``claim`` (at ``start`` in ``completion``) contradicts a value the
    words before it announce ("atomic number of 2" about chromium), or None."""
    profile = PROFILES.get(question.topic)
    if profile is None or not re.fullmatch(r"\d+", claim):
        return None
    before = re.split(r"[.!?;]", completion[max(0, start - 60):start])[-1]
    for attr, cue in profile.cues.items():
        values = question.values.get(attr) or []
        if values and claim not in values and re.search(
                cue + r"\W+(?:[A-Za-z]+\W+){0,3}$", before, re.IGNORECASE):
            return f"{attr} {claim} is not {values}"
    return None


def build(topic: str) -> list[Question]:
    """The long-form questions of ``topic`` about every entity with a value for each of
    its attributes (shot entities excepted)."""
    profile = PROFILES[topic]
    out = []
    for key, (name, values) in sorted(_table(topic).items()):
        if key in profile.shot_entities or not all(values.get(a) for a in profile.attributes):
            continue
        out.append(Question(
            id=f"{topic}:{key.partition(':')[2]}", topic=topic, domain=profile.domain,
            entity=key, subject=name, question=PHRASINGS[topic][0].format(name=name),
            answers=[v for a in profile.attributes for v in values[a]], answer_type="claims",
            values={a: values[a] for a in profile.attributes}, max_tokens=MAX_TOKENS,
            shots=shots(topic)))
    return out


def builder(topic: str) -> Callable[[], list[Question]]:
    return functools.partial(build, topic)


__all__ = ["MAX_TOKENS", "PHRASINGS", "PROFILES", "Profile", "build", "builder",
           "contradicted_number", "other_values", "shots"]
