"""Airports: IATA and ICAO codes of an airport, city served by an IATA code.

Ground truth: ``airportsdata`` (IATA/ICAO codes, names, city, country, subdivision). Asked
about: international airports of cities of ``MIN_CITY_POPULATION`` or more (geonames), in
countries and US states that are not held out, so no airport question names a held-out
place.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from probes.datasets.countries import ascii_fold, countries
from probes.datasets.facts import fact, shot_list
from probes.datasets.heldout_entities import is_heldout_entity
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import geonames, import_package

DOMAIN = "aviation"
MIN_CITY_POPULATION = 500_000
_SHOT_AIRPORTS = {"CDG", "NRT", "NBO"}

SHOTS = {
    "airport_iata": [
        ("What is the IATA code of Charles de Gaulle International Airport?", "CDG"),
        ("What is the IATA code of Narita International Airport?", "NRT"),
        ("What is the IATA code of Jomo Kenyatta International Airport?", "NBO"),
    ],
    "airport_icao": [
        ("What is the ICAO code of Charles de Gaulle International Airport?", "LFPG"),
        ("What is the ICAO code of Narita International Airport?", "RJAA"),
        ("What is the ICAO code of Jomo Kenyatta International Airport?", "HKJK"),
    ],
    "airport_city": [
        ("Which city is served by the airport with IATA code CDG?", "Paris"),
        ("Which city is served by the airport with IATA code NRT?", "Tokyo"),
        ("Which city is served by the airport with IATA code NBO?", "Nairobi"),
    ],
}
PHRASINGS = {
    "airport_iata": ("What is the IATA code of {name}?",
                     "Which three-letter IATA code does {name} have?",
                     "Give the IATA airport code of {name}."),
    "airport_icao": ("What is the ICAO code of {name}?",
                     "Which four-letter ICAO code does {name} have?",
                     "Give the ICAO airport code of {name}."),
    "airport_city": ("Which city is served by the airport with IATA code {name}?",
                     "The airport code {name} belongs to which city?",
                     "Name the city whose airport has the IATA code {name}."),
}


def shots(topic: str) -> list[Shot]:
    return shot_list(SHOTS, topic)


def _open_us_state(subdivision: str) -> bool:
    state = import_package("us").states.lookup(subdivision)
    return state is None or not is_heldout_entity(f"state:{state.abbr}")


@functools.lru_cache(maxsize=1)
def airports() -> list[dict[str, Any]]:
    """Records of the asked airports, sorted by IATA code."""
    table = countries()
    big = {(c["countrycode"], ascii_fold(c["name"]).casefold())
           for c in geonames().get_cities().values()
           if int(c["population"]) >= MIN_CITY_POPULATION}
    out = []
    for code, a in sorted(import_package("airportsdata").load("IATA").items()):
        cc = a["country"]
        if (code in _SHOT_AIRPORTS or "International" not in a["name"] or not a["icao"]
                or cc not in table or is_heldout_entity(f"country:{cc}")
                or (cc, ascii_fold(a["city"]).casefold()) not in big
                or (cc == "US" and not _open_us_state(a["subd"]))
                or not re.fullmatch(r"[A-Za-z0-9 .'()\-]+", ascii_fold(a["name"]))):
            continue
        out.append(a)
    return out


def build_airport_iata() -> list[Question]:
    topic = "airport_iata"
    return [fact(topic, DOMAIN, key=a["iata"], entity=f"airport:{a['iata']}", subject=a["name"],
                 question=PHRASINGS[topic][0].format(name=a["name"]), answers=[a["iata"]],
                 answer_type="symbol", shots=shots(topic)) for a in airports()]


def build_airport_icao() -> list[Question]:
    topic = "airport_icao"
    return [fact(topic, DOMAIN, key=a["iata"], entity=f"airport:{a['iata']}", subject=a["name"],
                 question=PHRASINGS[topic][0].format(name=a["name"]), answers=[a["icao"]],
                 answer_type="symbol", shots=shots(topic)) for a in airports()]


def build_airport_city() -> list[Question]:
    topic = "airport_city"
    return [fact(topic, DOMAIN, key=a["iata"], entity=f"airport:{a['iata']}", subject=a["iata"],
                 question=PHRASINGS[topic][0].format(name=a["iata"]),
                 answers=[a["city"], ascii_fold(a["city"])], shots=shots(topic))
            for a in airports()]


@functools.lru_cache(maxsize=1)
def known_codes() -> frozenset[str]:
    data = import_package("airportsdata").load("IATA")
    return frozenset(code.casefold() for code in data)


def known_names() -> set[str]:
    data = import_package("airportsdata").load("IATA")
    return {ascii_fold(a["name"]).casefold() for a in data.values()}


__all__ = ["airports", "build_airport_city", "build_airport_iata", "build_airport_icao",
           "known_codes", "known_names"]
