"""Questions about entities that do not exist: any substantive answer is a fabrication.

Names are made with ``faker`` (seeded, so a dataset is reproducible) and checked against
every real name the other builders know, so "Norvania" is never also a real country.
Each template reuses the few-shot examples of the real topic it imitates and belongs to
that topic's domain, so a cross-topic split holds out real and invented questions of a
domain together.
"""

from __future__ import annotations

import random
from types import ModuleType
from collections.abc import Callable

from probes.datasets import (
    airports,
    countries,
    country_facts,
    currencies,
    elements,
    languages,
    longform,
    national_days,
    us_states,
)
from probes.datasets.schema import AnswerType, Question, Shot
from probes.datasets.sources import import_package

_COUNTRY_SUFFIXES = ("onia", "avia", "istan", "ania", "oria", "esia", "ovia", "aria")


def _faker(seed: int):
    faker_mod = import_package("faker")
    fake = faker_mod.Faker("en_US")
    fake.seed_instance(seed)
    return fake


def _country_name(fake, rng: random.Random) -> str:
    root = fake.first_name()[: rng.choice((3, 4, 5))].rstrip("aeiouy")
    return (root + rng.choice(_COUNTRY_SUFFIXES)).capitalize()


def _element_name(fake, rng: random.Random) -> str:
    root = fake.last_name()[: rng.choice((4, 5, 6))].rstrip("aeiouy")
    return (root + "ium").capitalize()


def _city_name(fake, rng: random.Random) -> str:
    return fake.city()


_LANGUAGE_SUFFIXES = ("ish", "ese", "ic", "ian", "i")


def _language_name(fake, rng: random.Random) -> str:
    root = fake.last_name()[: rng.choice((3, 4, 5))].rstrip("aeiouy")
    return (root + rng.choice(_LANGUAGE_SUFFIXES)).capitalize()


def _currency_name(fake, rng: random.Random) -> str:
    """An invented country's adjective and a real unit: "Norvanian Dinar"."""
    unit = rng.choice(currencies.unit_words())
    return f"{_country_name(fake, rng)}n {unit.capitalize()}"


def _airport_name(fake, rng: random.Random) -> str:
    return f"{fake.city()} {_AIRPORT_SUFFIX}"


def _code(length: int, taken: Callable[[], set[str] | frozenset[str]], upper: bool
          ) -> Callable[..., str]:
    """Codes of ``length`` letters that no real entity has (``taken``, casefolded)."""
    def make(fake, rng: random.Random) -> str:
        code = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
        code = code.upper() if upper else code
        return code if code.casefold() not in taken() else ""
    return make


# template -> (domain, real topic whose shots it borrows, question pattern, name maker)
TEMPLATES: dict[str, tuple[str, str, str, Callable]] = {
    "invented_country_capital": ("geography", "country_capital",
                                 "What is the capital of {name}?", _country_name),
    "invented_country_currency": ("geography", "country_currency",
                                  "What is the currency of {name}?", _country_name),
    "invented_country_language": ("geography", "country_language",
                                  "What is the official language of {name}?", _country_name),
    "invented_city_country": ("geography", "city_country",
                              "In which country is the city of {name}?", _city_name),
    "invented_element_symbol": ("chemistry", "element_symbol",
                                "What is the chemical symbol of {name}?", _element_name),
    "invented_element_number": ("chemistry", "element_number",
                                "What is the atomic number of {name}?", _element_name),
    "invented_element_discoverer": ("chemistry", "element_discoverer",
                                    "Who discovered the chemical element {name}?", _element_name),
    "invented_state_capital": ("us_states", "state_capital",
                               "What is the capital of the US state of {name}?", _country_name),
    "invented_state_statehood": ("us_states", "state_statehood",
                                 "In what year did {name} become a US state?", _country_name),
}
# The breadth topics' twins: the pattern is always the real topic's first phrasing.
_BREADTH_MAKERS: dict[str, tuple[ModuleType, Callable[..., str]]] = {
    "language_code": (languages, _language_name),
    "language_from_code": (languages, _code(2, languages.known_codes, upper=False)),
    "language_script": (languages, _language_name),
    "language_autonym": (languages, _language_name),
    "currency_code": (currencies, _currency_name),
    "currency_from_code": (currencies, _code(3, currencies.known_codes, upper=True)),
    "airport_iata": (airports, _airport_name),
    "airport_icao": (airports, _airport_name),
    "airport_city": (airports, _code(3, airports.known_codes, upper=True)),
    "independence_day": (national_days, _country_name),
    "national_day": (national_days, _country_name),
    **{t: (country_facts, _country_name) for t in country_facts.PHRASINGS},
}
_BREADTH_MAKERS.update({
    "longform_country": (longform, _country_name),
    "longform_state": (longform, _country_name),
    "longform_element": (longform, _element_name),
    "longform_language": (longform, _language_name),
})
for _topic, (_module, _make) in _BREADTH_MAKERS.items():
    _domain = (getattr(_module, "DOMAIN", None) or country_facts.DOMAINS.get(_topic)
               or longform.PROFILES[_topic].domain)
    TEMPLATES[f"invented_{_topic}"] = (_domain, _topic, _module.PHRASINGS[_topic][0], _make)
# Codes are short by nature; every other invented name has at least five letters.
_SHORT_OK = {f"invented_{t}" for t in ("language_from_code", "currency_from_code",
                                         "airport_city")}
_MODULES = (countries, elements, us_states, languages, currencies, airports, national_days,
            country_facts)


def _shots(real_topic: str) -> list[Shot]:
    if real_topic in longform.PROFILES:
        return longform.shots(real_topic)
    for module in _MODULES:
        if real_topic in module.SHOTS:
            return module.shots(real_topic)
    raise KeyError(real_topic)


def _known() -> set[str]:
    return (countries.known_names() | elements.known_names() | us_states.known_names()
            | languages.known_names() | airports.known_names())


_AIRPORT_SUFFIX = "International Airport"


def _parts(key: str) -> list[str]:
    """Every run of consecutive words of a name, itself included, less the fixed words
    a maker adds (``_AIRPORT_SUFFIX``: they would be checked for every name)."""
    words = key.split()
    fixed = set(_AIRPORT_SUFFIX.casefold().split())
    runs = [words[i:j] for i in range(len(words)) for j in range(i + 1, len(words) + 1)]
    return [" ".join(run) for run in runs if not set(run) <= fixed]


def build_invented(*, per_template: int = 30, seed: int = 0,
                   templates: list[str] | None = None,
                   skip: Callable[[str], bool] | None = None) -> list[Question]:
    """``per_template`` questions for each template, about distinct invented names.

    ``skip(entity)`` rejects a name while generating (training passes the held-out test,
    so held-out invented names never reach it and each template still gets its count).
    """
    fake = _faker(seed)
    rng = random.Random(seed)
    known = _known()
    used: set[str] = set()
    out: list[Question] = []
    for topic in templates or list(TEMPLATES):
        domain, real_topic, pattern, make = TEMPLATES[topic]
        shots = _shots(real_topic)
        # A long-form twin is labelled claim by claim, with the real topic's budget.
        is_long = real_topic in longform.PROFILES
        answer_type: AnswerType = "claims" if is_long else "text"
        max_tokens = longform.MAX_TOKENS if is_long else None
        made = 0
        for _ in range(per_template * 50):
            if made >= per_template:
                break
            name = make(fake, rng)
            key = name.casefold()
            if (not name or key in known or key in used
                    or len(name) < (2 if topic in _SHORT_OK else 5)):
                continue
            if skip is not None and any(skip(f"invented:{part}") for part in _parts(key)):
                continue  # "Sarahland International Airport" would name "Sarahland"
            used.add(key)
            made += 1
            out.append(
                Question(
                    id=f"{topic}:{key.replace(' ', '_')}",
                    topic=topic,
                    domain=domain,
                    entity=f"invented:{key}",
                    subject=name,
                    question=pattern.format(name=name),
                    invented=True,
                    shots=shots,
                    answer_type=answer_type,
                    max_tokens=max_tokens,
                )
            )
    return out


__all__ = ["TEMPLATES", "build_invented"]
