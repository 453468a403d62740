"""Country codes and names: ISO 3166 codes, internet domain, demonym, native and foreign names.

Ground truth: ``countryinfo`` (ISO alpha-2/alpha-3, top-level domain, demonym, native name,
translations) over the country table of :mod:`probes.datasets.countries`. The entity is
the country, so held-out countries drop out in the registry like every other country
question. These facts are kept apart from the held-out ones (calling codes, neighbours,
regions): codes and names, not telephone numbers or borders.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from probes.datasets.countries import SHOT_COUNTRIES, Country, ascii_fold, countries
from probes.datasets.facts import fact, shot_list
from probes.datasets.schema import AnswerType, Question, Shot
from probes.datasets.sources import countryinfo_records

CODES = "country_codes"
NAMES = "country_names"
_LATIN = re.compile(r"[A-Za-z][A-Za-z .'\-]+")

SHOTS = {
    "country_alpha2": [("What is the two-letter ISO country code of France?", "FR"),
                       ("What is the two-letter ISO country code of Japan?", "JP"),
                       ("What is the two-letter ISO country code of Brazil?", "BR")],
    "country_alpha3": [("What is the three-letter ISO country code of France?", "FRA"),
                       ("What is the three-letter ISO country code of Japan?", "JPN"),
                       ("What is the three-letter ISO country code of Brazil?", "BRA")],
    "country_tld": [("What is the internet domain of France?", ".fr"),
                    ("What is the internet domain of Japan?", ".jp"),
                    ("What is the internet domain of Brazil?", ".br")],
    "country_demonym": [("What are people from France called?", "French"),
                        ("What are people from Japan called?", "Japanese"),
                        ("What are people from Brazil called?", "Brazilian")],
    "country_native_name": [("What is Brazil called in its own language?", "Brasil"),
                            ("What is Mexico called in its own language?", "México"),
                            ("What is Sweden called in its own language?", "Sverige")],
    "country_spanish_name": [("What is the Spanish name of France?", "Francia"),
                             ("What is the Spanish name of Japan?", "Japón"),
                             ("What is the Spanish name of Sweden?", "Suecia")],
    "country_german_name": [("What is the German name of France?", "Frankreich"),
                            ("What is the German name of Brazil?", "Brasilien"),
                            ("What is the German name of Sweden?", "Schweden")],
}
PHRASINGS = {
    "country_alpha2": ("What is the two-letter ISO country code of {name}?",
                       "Which ISO 3166 alpha-2 code stands for {name}?",
                       "Give the two-letter country code of {name}."),
    "country_alpha3": ("What is the three-letter ISO country code of {name}?",
                       "Which ISO 3166 alpha-3 code stands for {name}?",
                       "Give the three-letter country code of {name}."),
    "country_tld": ("What is the internet domain of {name}?",
                    "Which top-level domain belongs to {name}?",
                    "Give the country code top-level domain of {name}."),
    "country_demonym": ("What are people from {name} called?",
                        "What is the demonym for people from {name}?",
                        "Name the word for a person from {name}."),
    "country_native_name": ("What is {name} called in its own language?",
                            "What do the people of {name} call their country?",
                            "Give the native name of {name}."),
    "country_spanish_name": ("What is the Spanish name of {name}?",
                             "What is {name} called in Spanish?",
                             "Give the name of {name} in Spanish."),
    "country_german_name": ("What is the German name of {name}?",
                            "What is {name} called in German?",
                            "Give the name of {name} in German."),
}
DOMAINS = {t: CODES if t in ("country_alpha2", "country_alpha3", "country_tld") else NAMES
           for t in PHRASINGS}


def shots(topic: str) -> list[Shot]:
    return shot_list(SHOTS, topic)


def _build(topic: str, answers: Callable[[Country, dict[str, Any]], list[str]],
           answer_type: AnswerType = "text") -> list[Question]:
    info = countryinfo_records()
    out = []
    for iso, c in sorted(countries().items()):
        if iso in SHOT_COUNTRIES:
            continue
        found = [a for a in answers(c, info.get(iso, {})) if a]
        if found:
            out.append(fact(topic, DOMAINS[topic], key=iso, entity=f"country:{iso}",
                            subject=c.name, question=PHRASINGS[topic][0].format(name=c.name),
                            answers=found, answer_type=answer_type, shots=shots(topic)))
    return out


def _foreign(lang: str) -> Callable[[Country, dict[str, Any]], list[str]]:
    """The country's name in ``lang``, when it is written in Latin letters and differs
    from the English one (else the question would be a copy task)."""
    def get(c: Country, record: dict[str, Any]) -> list[str]:
        name = str((record.get("translations") or {}).get(lang) or "")
        folded = ascii_fold(name)
        if not _LATIN.fullmatch(folded) or folded.casefold() in {
                ascii_fold(n).casefold() for n in c.names}:
            return []
        return [name, folded]
    return get


def build_country_alpha2() -> list[Question]:
    return _build("country_alpha2", lambda c, r: [c.iso], "symbol")


def build_country_alpha3() -> list[Question]:
    return _build("country_alpha3",
                  lambda c, r: [str((r.get("ISO") or {}).get("alpha3") or "")], "symbol")


def build_country_tld() -> list[Question]:
    """Answers with and without the dot (".de", "de"); normalisation drops the dot."""
    return _build("country_tld", lambda c, r: [t for t in r.get("tld") or []
                                               if re.fullmatch(r"\.[a-z]{2}", t)], "symbol")


def build_country_demonym() -> list[Question]:
    def get(c: Country, r: dict[str, Any]) -> list[str]:
        d = c.demonym
        if not d or not _LATIN.fullmatch(ascii_fold(d)):
            return []
        return [d, d + "s"] if not d.endswith(("s", "sh", "ch", "ese")) else [d]
    return _build("country_demonym", get)


def build_country_native_name() -> list[Question]:
    def get(c: Country, r: dict[str, Any]) -> list[str]:
        native = str(r.get("nativeName") or "")
        folded = ascii_fold(native)
        if (not _LATIN.fullmatch(folded) or len(folded) < len(native) - 2
                or folded.casefold() in {ascii_fold(n).casefold() for n in c.names}):
            return []
        return [native, folded]
    return _build("country_native_name", get)


def build_country_spanish_name() -> list[Question]:
    return _build("country_spanish_name", _foreign("es"))


def build_country_german_name() -> list[Question]:
    return _build("country_german_name", _foreign("de"))


__all__ = ["build_country_alpha2", "build_country_alpha3", "build_country_demonym",
           "build_country_german_name", "build_country_native_name",
           "build_country_spanish_name", "build_country_tld"]
