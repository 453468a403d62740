"""Currencies: ISO 4217 code of a currency and currency of a code.

Ground truth: ``pycountry`` (ISO 4217 codes and names) joined with the country table of
:mod:`probes.datasets.countries` (who uses each currency, for qualified aliases such as
"Nigerian naira"). Only currencies some country in that table uses are asked about, and
only countries that are not held out (:func:`is_heldout_entity`) name or qualify one:
"GHS is the Ghanaian cedi" would tell training a held-out country's currency.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from probes.datasets.countries import _CURRENCY_EXTRA, Country, countries
from probes.datasets.facts import fact, shot_list, unique
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import import_package

DOMAIN = "currencies"
_SHOT_CURRENCIES = {"JPY", "MXN", "SEK"}

SHOTS = {
    "currency_code": [
        ("What is the ISO 4217 code of the Yen?", "JPY"),
        ("What is the ISO 4217 code of the Mexican Peso?", "MXN"),
        ("What is the ISO 4217 code of the Swedish Krona?", "SEK"),
    ],
    "currency_from_code": [
        ("Which currency has the ISO 4217 code JPY?", "Japanese yen"),
        ("Which currency has the ISO 4217 code MXN?", "Mexican peso"),
        ("Which currency has the ISO 4217 code SEK?", "Swedish krona"),
    ],
}
PHRASINGS = {
    "currency_code": ("What is the ISO 4217 code of the {name}?",
                      "Which three-letter ISO code stands for the {name}?",
                      "Give the ISO 4217 currency code of the {name}."),
    "currency_from_code": ("Which currency has the ISO 4217 code {name}?",
                           "The currency code {name} stands for which currency?",
                           "Name the currency whose ISO 4217 code is {name}."),
}


def shots(topic: str) -> list[Shot]:
    return shot_list(SHOTS, topic)


@dataclass(frozen=True)
class Currency:
    code: str
    name: str  # ISO 4217 name (pycountry), the subject of currency_code
    answers: list[str]
    near: list[str]


def _unit_names(name: str) -> list[str]:
    """"Yuan Renminbi" -> itself and "Renminbi"; "Riels" -> "Riel" too."""
    out = [name, name.split()[-1]]
    return unique(out + [v[:-1] for v in out if v.endswith("s") and len(v) > 4])


@functools.lru_cache(maxsize=1)
def currencies() -> dict[str, Currency]:
    """Currencies used by a country that is not held out, with their accepted names."""
    pycountry = import_package("pycountry")
    users: dict[str, list[Country]] = {}
    for c in countries().values():
        if c.currency_code:
            users.setdefault(c.currency_code, []).append(c)
    units: dict[str, set[str]] = {}
    table: dict[str, tuple[str, list[Country], list[str]]] = {}
    for cur in pycountry.currencies:
        code = cur.alpha_3
        open_users = [c for c in users.get(code, []) if not is_heldout_entity(f"country:{c.iso}")]
        if not open_users:
            continue
        names = unique([str(cur.name), *[c.currency_name for c in open_users if c.currency_name]])
        variants = unique([v for n in names for v in _unit_names(n)])
        table[code] = (str(cur.name), open_users, variants)
        for v in variants:
            units.setdefault(v.casefold(), set()).add(code)
    out: dict[str, Currency] = {}
    for code, (name, open_users, variants) in table.items():
        qualified = [f"{q} {v}" for v in variants for c in open_users
                     for q in (c.demonym, c.name) if q]
        # A bare unit ("Dollar") is right only when no other currency shares it.
        own = [v for v in variants if units[v.casefold()] == {code}]
        shared = [v for v in variants if units[v.casefold()] != {code}]
        out[code] = Currency(code=code, name=name,
                             answers=unique([name, *own, *qualified,
                                             *_CURRENCY_EXTRA.get(code, [])]),
                             near=shared)
    return out


def _rows() -> list[Currency]:
    return [c for code, c in sorted(currencies().items()) if code not in _SHOT_CURRENCIES]


def build_currency_code() -> list[Question]:
    topic = "currency_code"
    return [fact(topic, DOMAIN, key=c.code, entity=f"currency:{c.code}", subject=c.name,
                 question=PHRASINGS[topic][0].format(name=c.name), answers=[c.code],
                 answer_type="symbol", shots=shots(topic)) for c in _rows()]


def build_currency_from_code() -> list[Question]:
    topic = "currency_from_code"
    return [fact(topic, DOMAIN, key=c.code, entity=f"currency:{c.code}", subject=c.code,
                 question=PHRASINGS[topic][0].format(name=c.code), answers=c.answers,
                 near=c.near, shots=shots(topic)) for c in _rows()]


def unit_words() -> list[str]:
    """Units of the asked currencies ("dollar", "franc"): invented currencies use them."""
    return sorted({c.name.split()[-1].lower() for c in currencies().values()
                   if c.name.split()[-1].isalpha() and c.name.split()[-1][0].isupper()})


def known_codes() -> set[str]:
    pycountry = import_package("pycountry")
    return {str(c.alpha_3).casefold() for c in pycountry.currencies}


__all__ = ["build_currency_code", "build_currency_from_code", "currencies", "known_codes",
           "unit_words"]
