"""Questions about entities that do not exist: any substantive answer is a fabrication.

Names are made with ``faker`` (seeded, so a dataset is reproducible) and checked against
every real name the other builders know, so "Norvania" is never also a real country.
Each template reuses the few-shot examples of the real topic it imitates and belongs to
that topic's domain, so a cross-topic split holds out real and invented questions of a
domain together.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from probes.datasets import countries, elements, us_states
from probes.datasets.schema import Question, Shot
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


def _shots(real_topic: str) -> list[Shot]:
    for module in (countries, elements, us_states):
        if real_topic in module.SHOTS:
            return module.shots(real_topic)
    raise KeyError(real_topic)


def _known() -> set[str]:
    return countries.known_names() | elements.known_names() | us_states.known_names()


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
        made = 0
        for _ in range(per_template * 50):
            if made >= per_template:
                break
            name = make(fake, rng)
            key = name.casefold()
            if key in known or key in used or len(name) < 5:
                continue
            if skip is not None and skip(f"invented:{key}"):
                continue
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
                )
            )
    return out


__all__ = ["TEMPLATES", "build_invented"]
