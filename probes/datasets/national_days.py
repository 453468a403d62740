"""Holidays: the date of a country's Independence Day and of its National Day.

Ground truth: the ``holidays`` package (public holidays per country, English names). Only
holidays with that exact name on the same day in three consecutive years are asked about
(a fixed date), for countries of the table in :mod:`probes.datasets.countries`. The
entity is the country, so held-out countries drop out in the registry like every other
country question.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging

from probes.datasets.countries import SHOT_COUNTRIES, countries
from probes.datasets.facts import fact, shot_list
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import import_package

logger = logging.getLogger(__name__)

DOMAIN = "holidays"
YEARS = (2023, 2024, 2025)
HOLIDAYS = {"independence_day": "Independence Day", "national_day": "National Day"}

SHOTS = {
    "independence_day": [
        ("On what date is Independence Day celebrated in Mexico?", "September 16"),
        ("On what date is Independence Day celebrated in Brazil?", "September 7"),
    ],
    "national_day": [
        ("On what date is National Day celebrated in France?", "July 14"),
        ("On what date is National Day celebrated in Sweden?", "June 6"),
    ],
}
PHRASINGS = {
    topic: (f"On what date is {name} celebrated in {{name}}?",
            f"{{name}} celebrates its {name} on which date?",
            f"Give the date of {name} in {{name}}.")
    for topic, name in HOLIDAYS.items()
}


def shots(topic: str) -> list[Shot]:
    return shot_list(SHOTS, topic)


def date_names(day: dt.date) -> list[str]:
    """Ways of writing a day of the year: "March 6", "6 March", "March 6th", "6th of March"."""
    month = day.strftime("%B")
    n = day.day
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return [f"{month} {n}", f"{n} {month}", f"{month} {n}{suffix}", f"{n}{suffix} {month}",
            f"{n}{suffix} of {month}", f"the {n}{suffix} of {month}"]


@functools.lru_cache(maxsize=1)
def fixed_dates() -> dict[str, dict[str, dt.date]]:
    """holiday topic -> country ISO -> its fixed date (in the first of ``YEARS``)."""
    holidays = import_package("holidays")
    supported = holidays.list_supported_countries()
    out: dict[str, dict[str, dt.date]] = {t: {} for t in HOLIDAYS}
    for iso in sorted(countries()):
        if iso not in supported:
            continue
        try:
            per_year = [holidays.country_holidays(iso, years=y, language="en_US") for y in YEARS]
        except (NotImplementedError, KeyError, ValueError):
            try:
                per_year = [holidays.country_holidays(iso, years=y) for y in YEARS]
            except (NotImplementedError, KeyError, ValueError) as exc:
                logger.debug("no holidays for %s: %s", iso, exc)
                continue
        for topic, name in HOLIDAYS.items():
            days = [{(d.month, d.day) for d, names in h.items()
                     if name in [n.strip() for n in names.split(";")]} for h in per_year]
            if len(days[0]) == 1 and all(d == days[0] for d in days):
                month, day = next(iter(days[0]))
                out[topic][iso] = dt.date(YEARS[0], month, day)
    return out


def _build(topic: str) -> list[Question]:
    table = countries()
    return [fact(topic, DOMAIN, key=iso, entity=f"country:{iso}", subject=table[iso].name,
                 question=PHRASINGS[topic][0].format(name=table[iso].name),
                 answers=date_names(day), shots=shots(topic))
            for iso, day in sorted(fixed_dates()[topic].items()) if iso not in SHOT_COUNTRIES]


def build_independence_day() -> list[Question]:
    return _build("independence_day")


def build_national_day() -> list[Question]:
    return _build("national_day")


__all__ = ["build_independence_day", "build_national_day", "date_names", "fixed_dates"]
