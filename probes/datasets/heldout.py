"""Held-out topics: question templates and subjects that training never uses.

A probe judged on its own training templates measures how well it learned the template.
These topics ask about *held-out entities only* (:func:`is_heldout_entity`; the registry
drops every question about them from training) with templates no training topic uses, so
the served evaluation (``benchmarks/heldout.py``) measures the probe on new facts, new
wording and new subjects at once. Ground truth comes from the same knowledge-base packages
training uses (see :mod:`probes.datasets.sources`):

- ``heldout_region_country``: a first-level subdivision (pycountry) -> its country;
- ``heldout_country_neighbour``: a country -> any country it borders (countryinfo);
- ``heldout_calling_code``: a country -> its international calling code (countryinfo);
- ``heldout_us_city_state``: a US city of 50k+ people (geonames) -> its state;
- ``heldout_element_year``: an element -> the year it was discovered (mendeleev);

and in domains no training topic covers (:mod:`probes.datasets.heldout_domains`; entity
kinds ``city`` and ``unit`` are held out whole, :data:`HELDOUT_ONLY_DOMAINS`), each asked in
several wordings (:data:`PHRASINGS`, one per question by a seeded hash):

- ``heldout_city_timezone``: a city of 100k+ people (geonames) -> its IANA zone (tzdata);
- ``heldout_city_utc_offset``: a city -> its UTC offset in winter or summer (tzdata);
- ``heldout_unit_symbol``: a unit of measurement -> its symbol (pint's definitions);
- ``heldout_unit_quantity``: a unit -> the physical quantity it measures (pint);

and for each an ``..._invented`` twin about subjects that do not exist (faker, seeded,
names whose entity key hashes into the held-out bucket, which the training generator skips).
:func:`longform_subjects` lists the countries (real held-out and invented) the long-form
style asks about, with every true value of each attribute for claim labelling.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from probes.datasets import countries as countries_mod
from probes.datasets import elements as elements_mod
from probes.datasets import heldout_domains as domains_mod
from probes.datasets import us_states as us_states_mod
from probes.datasets.countries import Country, ascii_fold
from probes.datasets.heldout_entities import invented_entity, is_heldout_entity
from probes.datasets.phrasing import rephrase
from probes.datasets.schema import Question, Shot
from probes.datasets.sources import (
    countryinfo_records,
    element_rows,
    geonames,
    import_package,
)

REGIONS_PER_COUNTRY = 4
CITIES_PER_STATE = 8
CITY_MIN_POPULATION = 50_000
INVENTED_PER_TOPIC = 24
_SUBDIVISION_TYPES_SKIPPED = re.compile(r"city|capital|municipality|district|town", re.I)

# template, shots (question, answer) of each held-out topic. Shots name only entities that
# are never held out (few-shot examples of training topics), so they add no held-out fact.
TEMPLATES: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "heldout_region_country": (
        "geography", "Which country is the region of {name} part of?",
        [("Which country is the region of Hokkaido part of?", "Japan"),
         ("Which country is the region of Catalonia part of?", "Spain")]),
    "heldout_country_neighbour": (
        "geography", "Name a country that shares a border with {name}.",
        [("Name a country that shares a border with France.", "Spain"),
         ("Name a country that shares a border with Kenya.", "Tanzania")]),
    "heldout_calling_code": (
        "geography", "What is the international telephone calling code of {name}?",
        [("What is the international telephone calling code of France?", "+33"),
         ("What is the international telephone calling code of Japan?", "+81")]),
    "heldout_us_city_state": (
        "us_states", "Which US state is the city of {name} located in?",
        [("Which US state is the city of Houston located in?", "Texas"),
         ("Which US state is the city of Miami located in?", "Florida")]),
    "heldout_element_year": (
        "chemistry", "In which year was the chemical element {name} first discovered?",
        [("In which year was the chemical element Oxygen first discovered?", "1774"),
         ("In which year was the chemical element Helium first discovered?", "1868")]),
    # Held-out-only domains. Time-zone shots are training cities (city_country subjects,
    # never asked here); unit shots are units these topics never ask about (SHOT_UNITS).
    "heldout_city_timezone": (
        "time_zones", "Which IANA time zone does the city of {name} use?",
        [("Which IANA time zone does the city of Yokohama use?", "Asia/Tokyo"),
         ("Which IANA time zone does the city of Giza use?", "Africa/Cairo")]),
    "heldout_city_utc_offset": (
        "time_zones", "What is the UTC offset of local time in {name}?",
        [("What is the UTC offset of local time in Yokohama?", "UTC+9"),
         ("What is the UTC offset of local time in Giza?", "UTC+2")]),
    "heldout_unit_symbol": (
        "units", "What is the symbol of the unit of measurement called the {name}?",
        [("What is the symbol of the unit of measurement called the meter?", "m"),
         ("What is the symbol of the unit of measurement called the second?", "s")]),
    "heldout_unit_quantity": (
        "units", "Which physical quantity is measured in the unit called the {name}?",
        [("Which physical quantity is measured in the unit called the meter?", "length"),
         ("Which physical quantity is measured in the unit called the second?", "time")]),
}
# Further wordings of the held-out-only domains' topics (the first is TEMPLATES'); a
# question and its shots get one of them (probes.datasets.phrasing.rephrase, seeded).
PHRASINGS: dict[str, tuple[str, ...]] = {
    "heldout_city_timezone": (
        TEMPLATES["heldout_city_timezone"][1],
        "Name the tz database time zone identifier for {name}.",
        "{name} keeps time by which zone of the IANA time zone database?"),
    "heldout_city_utc_offset": (
        TEMPLATES["heldout_city_utc_offset"][1],
        "How many hours ahead of or behind UTC are clocks in {name}?",
        "Relative to Coordinated Universal Time, what offset do clocks in {name} show?"),
    "heldout_unit_symbol": (
        TEMPLATES["heldout_unit_symbol"][1],
        "How is the unit {name} written as a symbol?",
        "Give the abbreviation a scientist writes for the unit {name}."),
    "heldout_unit_quantity": (
        TEMPLATES["heldout_unit_quantity"][1],
        "The {name} is a unit of what?",
        "What does a measurement in {name} units quantify?"),
}
# Domains only the held-out set asks about, with the entity kinds their topics use: no
# training topic may have such a domain or such an entity (test_heldout_leakage).
HELDOUT_ONLY_DOMAINS: dict[str, str] = {"time_zones": "city", "units": "unit"}
SHOT_UNITS = ("meter", "second")
CITIES_PER_ZONE = 2
CITY_ZONE_TOPIC_SIZE = 60
UNIT_TOPIC_SIZE = 60
REAL_TOPICS = tuple(TEMPLATES)
INVENTED_TOPICS = tuple(f"{t}_invented" for t in TEMPLATES)
TOPICS = REAL_TOPICS + INVENTED_TOPICS


_LONGFORM_DOMAINS = {"longform_country": "geography", "longform_city": "time_zones"}


def domain_of(topic: str) -> str:
    """The domain of a held-out topic, its invented twin, or a long-form family."""
    if topic in _LONGFORM_DOMAINS:
        return _LONGFORM_DOMAINS[topic]
    return TEMPLATES[topic.removesuffix("_invented")][0]


def _shots(topic: str) -> list[Shot]:
    return [Shot(question=q, answer=a) for q, a in TEMPLATES[topic][2]]


def _question(topic: str, key: str, entity: str, subject: str, answers: list[str], *,
              answer_type: str = "text", near: list[str] | None = None,
              invented: bool = False) -> Question:
    base = topic.removesuffix("_invented")
    domain, pattern, _ = TEMPLATES[base]
    return Question(
        id=f"{topic}:{key}", topic=topic, domain=domain, entity=entity, subject=subject,
        question=pattern.format(name=subject), answers=[] if invented else answers,
        near_misses=near or [], answer_type=answer_type,  # type: ignore[arg-type]
        invented=invented, shots=_shots(base),
    )


def heldout_countries() -> list[Country]:
    """Held-out countries of the training table (its population cut and joins)."""
    return [c for iso, c in sorted(countries_mod.countries().items())
            if is_heldout_entity(f"country:{iso}")]


@functools.lru_cache(maxsize=1)
def _training_subjects() -> set[str]:
    """Subjects of every training builder (casefolded, accents folded): a held-out subject
    must not be one (e.g. a US city that ``city_country`` asks about)."""
    from probes.datasets.registry import TOPICS as TRAINING_TOPICS

    out: set[str] = set()
    for topic in TRAINING_TOPICS.values():
        if not topic.invented:
            out.update(ascii_fold(q.subject).casefold() for q in topic.build())
    return out


def _stable_order(items: list, key: Callable[[object], str]) -> list:
    return sorted(items, key=lambda x: random.Random(key(x)).random())


# ----------------------------------------------------------------------------- real topics
def build_region_country() -> list[Question]:
    pycountry = import_package("pycountry")
    topic = "heldout_region_country"
    known = countries_mod.known_names()
    training = _training_subjects()
    used: set[str] = set()
    out: list[Question] = []
    for c in heldout_countries():
        subs = [s for s in (pycountry.subdivisions.get(country_code=c.iso) or [])
                if s.parent_code is None and not _SUBDIVISION_TYPES_SKIPPED.search(s.type)]
        taken = 0
        for s in _stable_order(subs, key=lambda s: s.code):
            name = re.sub(r"\s*\[.*?\]|\s*\(.*?\)", "", s.name).strip()
            folded = ascii_fold(name).casefold()
            if (taken >= REGIONS_PER_COUNTRY or not folded or folded in known
                    or folded in training or folded in used
                    or any(ascii_fold(n).casefold() in folded for n in c.names)
                    or not re.fullmatch(r"[A-Za-z .'\-]+", ascii_fold(name))):
                continue
            used.add(folded)
            taken += 1
            out.append(_question(topic, s.code, f"country:{c.iso}", name, c.names,
                                 near=countries_mod._COUNTRY_NEAR.get(c.iso, [])))
    return out


def _alpha3_to_iso() -> dict[str, str]:
    out = {}
    for iso, record in countryinfo_records().items():
        a3 = (record.get("ISO") or {}).get("alpha3")
        if a3:
            out[a3] = iso
    return out


def build_country_neighbour() -> list[Question]:
    topic = "heldout_country_neighbour"
    table = countries_mod.countries()
    a3 = _alpha3_to_iso()
    info = countryinfo_records()
    out = []
    for c in heldout_countries():
        borders = [a3[b] for b in info.get(c.iso, {}).get("borders") or [] if b in a3]
        answers = [n for iso in borders if iso in table for n in table[iso].names]
        if answers:
            out.append(_question(topic, c.iso, f"country:{c.iso}", c.name, answers))
    return out


def build_calling_code() -> list[Question]:
    """Calling codes of one to three digits ("+1 268" style codes are skipped: their first
    number alone is ambiguous)."""
    topic = "heldout_calling_code"
    info = countryinfo_records()
    out = []
    for c in heldout_countries():
        codes = [str(x) for x in info.get(c.iso, {}).get("callingCodes") or []
                 if str(x).isdigit() and len(str(x)) <= 3]
        if codes:
            out.append(_question(topic, c.iso, f"country:{c.iso}", c.name, codes,
                                 answer_type="number"))
    return out


def build_us_city_state() -> list[Question]:
    topic = "heldout_us_city_state"
    us = import_package("us")
    states = {s.abbr: s for s in us.STATES if is_heldout_entity(f"state:{s.abbr}")}
    us_cities = [c for c in geonames().get_cities().values() if c["countrycode"] == "US"]
    counts: dict[str, int] = {}
    for city in us_cities:
        counts[city["name"].casefold()] = counts.get(city["name"].casefold(), 0) + 1
    skip = _training_subjects() | us_states_mod.known_names() | countries_mod.known_names()
    taken: dict[str, int] = {}
    out = []
    for city in sorted(us_cities, key=lambda c: -int(c["population"])):
        state = states.get(city["admin1code"])
        name = city["name"]
        if (state is None or int(city["population"]) < CITY_MIN_POPULATION
                or counts[name.casefold()] > 1 or ascii_fold(name).casefold() in skip
                or taken.get(state.abbr, 0) >= CITIES_PER_STATE
                or state.name.casefold() in name.casefold()):
            continue
        taken[state.abbr] = taken.get(state.abbr, 0) + 1
        out.append(_question(topic, str(city["geonameid"]), f"state:{state.abbr}", name,
                             [state.name, state.abbr]))
    return out


def build_element_year() -> list[Question]:
    topic = "heldout_element_year"
    return [
        _question(topic, str(r["atomic_number"]), f"element:{r['atomic_number']}", r["name"],
                  [str(r["discovery_year"])], answer_type="number")
        for r in element_rows()
        if r["discovery_year"] and is_heldout_entity(f"element:{r['atomic_number']}")
    ]


# ----------------------------------------------------------------------------- held-out-only domains
_PLAIN_NAME = re.compile(r"[A-Za-z][A-Za-z .'\-]*")


@functools.lru_cache(maxsize=1)
def _city_pool() -> tuple[domains_mod.CityZone, ...]:
    """Cities the time-zone topics ask about, most populous first: not a training subject
    nor a known country/state/element name, not named in its own zone's names (the answer
    would copy the question), a zone with a non-zero offset (a bare "UTC"/"GMT" answer
    cannot be told from "UTC+1" by word matching), at most ``2 * CITIES_PER_ZONE`` per zone
    (the two topics alternate over it)."""
    skip = (_training_subjects() | countries_mod.known_names() | us_states_mod.known_names()
            | elements_mod.known_names()
            | {_fold_name(q) for t in ("heldout_city_timezone", "heldout_city_utc_offset")
               for q, _ in TEMPLATES[t][2]})
    per_zone: dict[str, int] = {}
    out = []
    for city in domains_mod.city_zones():
        folded = ascii_fold(city.name).casefold()
        zones = ascii_fold(" ".join(city.zone_names)).casefold().replace("_", " ")
        if (folded in skip or not _PLAIN_NAME.fullmatch(ascii_fold(city.name))
                or folded in zones or 0.0 in city.offsets
                or per_zone.get(city.zone, 0) >= 2 * CITIES_PER_ZONE):
            continue
        per_zone[city.zone] = per_zone.get(city.zone, 0) + 1
        out.append(city)
    return tuple(out)


def _fold_name(shot_question: str) -> str:
    """The subject of a time-zone shot question (the city after "city of"/"in")."""
    m = re.search(r"(?:city of|in) ([^?]+)\?$", shot_question)
    return ascii_fold(m.group(1) if m else shot_question).casefold()


def build_city_timezone() -> list[Question]:
    topic = "heldout_city_timezone"
    return [_question(topic, str(c.geonameid), f"city:{c.geonameid}", c.name,
                      list(c.zone_names))
            for c in _city_pool()[0::2][:CITY_ZONE_TOPIC_SIZE]]


def build_city_utc_offset() -> list[Question]:
    """Winter and summer offsets both count (the question names no date), in the usual
    spellings, and the zone's abbreviations ("CET", "CEST")."""
    topic = "heldout_city_utc_offset"
    out = []
    for c in _city_pool()[1::2][:CITY_ZONE_TOPIC_SIZE]:
        answers = [f for h in c.offsets for f in domains_mod.offset_forms(h)]
        out.append(_question(topic, str(c.geonameid), f"city:{c.geonameid}", c.name,
                             answers + list(c.abbreviations)))
    return out


_OBSCURE_UNIT = re.compile(r"\d|^atomic unit|^planck|international|conventional|^us |"
                           r"^imperial|^survey|thermochemical", re.I)


def _unit_pool() -> list[domains_mod.Unit]:
    """Units the unit topics may ask about: plain names, not a shot unit, not a training
    subject or a known country/state/element name, in a stable order."""
    skip = (_training_subjects() | countries_mod.known_names() | us_states_mod.known_names()
            | elements_mod.known_names())
    units = [u for u in domains_mod.units()
             if u.key not in SHOT_UNITS and not _OBSCURE_UNIT.search(u.name)
             and _PLAIN_NAME.fullmatch(u.name) and u.name.casefold() not in skip]
    return _stable_order(units, key=lambda u: f"unit:{u.key}")  # type: ignore[attr-defined]


def build_unit_symbol() -> list[Question]:
    """Symbols of plain ASCII letters ("Pa", "kWh"; not "Ω" or "°C", which answers spell
    in too many ways), other than the name itself; short aliases ("hr") also count."""
    topic = "heldout_unit_symbol"
    out = []
    for u in _unit_pool():
        if (not re.fullmatch(r"[A-Za-z]{1,5}", u.symbol)
                or u.symbol.casefold() == u.name.casefold()):
            continue
        short = [a for a in u.aliases if re.fullmatch(r"[A-Za-z]{1,4}", a)]
        out.append(_question(topic, u.key, f"unit:{u.key}", u.name, [u.symbol, *short],
                             answer_type="symbol"))
    return out[:UNIT_TOPIC_SIZE]


def build_unit_quantity() -> list[Question]:
    """The quantity pint lists the unit under, with the names an answer may use for it;
    units whose name already says the quantity ("horsepower": power) are skipped."""
    topic = "heldout_unit_quantity"
    out = []
    for u in _unit_pool():
        aliases = domains_mod.QUANTITY_ALIASES.get(u.quantity)
        if not aliases or any(a in u.name.casefold() for a in aliases):
            continue
        out.append(_question(topic, u.key, f"unit:{u.key}", u.name, list(aliases)))
    return out[:UNIT_TOPIC_SIZE]


# ----------------------------------------------------------------------------- invented
_REGION_SUFFIXES = ("shire", "vale", "mark", "land", "ia Province")
_COUNTRY_SUFFIXES = ("ovia", "andia", "eria", "ustan", "alia", "enia")
_ELEMENT_SUFFIXES = ("onium", "ite", "ium")
_UNIT_SUFFIXES = ("ton", "el", "ard", "ine", "ot", "erg")


def _invented_names(kind: str) -> Callable[[object, random.Random], str]:
    def make(fake, rng: random.Random) -> str:
        if kind == "city":
            return str(fake.city())
        if kind == "unit":  # lower case, as unit names are ("kowalton")
            root = str(fake.last_name())[: rng.choice((3, 4, 5))].lower().rstrip("aeiouy")
            return root + rng.choice(_UNIT_SUFFIXES)
        root = fake.last_name()[: rng.choice((4, 5, 6))].rstrip("aeiouy")
        suffixes = {"region": _REGION_SUFFIXES, "country": _COUNTRY_SUFFIXES,
                    "element": _ELEMENT_SUFFIXES}[kind]
        return root.capitalize() + rng.choice(suffixes)
    return make


_INVENTED_KIND = {"heldout_region_country": "region", "heldout_country_neighbour": "country",
                  "heldout_calling_code": "country", "heldout_us_city_state": "city",
                  "heldout_element_year": "element", "heldout_city_timezone": "city",
                  "heldout_city_utc_offset": "city", "heldout_unit_symbol": "unit",
                  "heldout_unit_quantity": "unit"}


@functools.lru_cache(maxsize=1)
def _real_names() -> frozenset[str]:
    us_cities = {ascii_fold(c["name"]).casefold() for c in geonames().get_cities().values()}
    return frozenset(countries_mod.known_names() | elements_mod.known_names()
                     | us_states_mod.known_names() | us_cities | _training_subjects()
                     | domains_mod.unit_names())


def invented_subjects(kind: str, n: int, *, seed: int = 0, exclude: set[str] | None = None
                      ) -> list[str]:
    """``n`` invented names of a kind, reproducible, never a real name, and always in the
    held-out bucket (:func:`is_heldout_entity`), so training never generates them."""
    fake = import_package("faker").Faker("en_US")
    fake.seed_instance(f"heldout:{kind}:{seed}")
    rng = random.Random(f"heldout:{kind}:{seed}")
    make = _invented_names(kind)
    real = _real_names()
    used = set(exclude or ())
    out: list[str] = []
    for _ in range(n * 400):
        if len(out) >= n:
            break
        name = make(fake, rng)
        key = name.casefold()
        if (len(name) < 5 or key in used or ascii_fold(name).casefold() in real
                or not is_heldout_entity(invented_entity(name))):
            continue
        used.add(key)
        out.append(name)
    return out


def build_invented(topic: str, n: int = INVENTED_PER_TOPIC, *, seed: int = 0) -> list[Question]:
    """Questions of a held-out template about ``n`` subjects that do not exist."""
    base = topic.removesuffix("_invented")
    # The held-out-only domains' twins get seeds of their own (len(base) alone gives
    # heldout_city_timezone the names of heldout_us_city_state).
    offset = 1000 + list(PHRASINGS).index(base) if base in PHRASINGS else len(base)
    names = invented_subjects(_INVENTED_KIND[base], n, seed=seed + offset)
    return [_question(topic, name.casefold().replace(" ", "_"), invented_entity(name), name,
                      [], invented=True) for name in names]


BUILDERS: dict[str, Callable[[], list[Question]]] = {
    "heldout_region_country": build_region_country,
    "heldout_country_neighbour": build_country_neighbour,
    "heldout_calling_code": build_calling_code,
    "heldout_us_city_state": build_us_city_state,
    "heldout_element_year": build_element_year,
    "heldout_city_timezone": build_city_timezone,
    "heldout_city_utc_offset": build_city_utc_offset,
    "heldout_unit_symbol": build_unit_symbol,
    "heldout_unit_quantity": build_unit_quantity,
}


def build_heldout(topics: list[str] | None = None, *, invented_per_topic: int = INVENTED_PER_TOPIC,
                  limit_per_topic: int | None = None, seed: int = 0) -> list[Question]:
    """Questions of the held-out topics (all by default; a domain name such as
    ``time_zones`` stands for its topics and their twins), subsampled reproducibly."""
    names: list[str] = []
    for name in topics or TOPICS:
        for topic in [t for t in TOPICS if domain_of(t) == name] or [name]:
            if topic not in names:
                names.append(topic)
    unknown = [n for n in names if n not in TOPICS]
    if unknown:
        raise ValueError(f"unknown held-out topic(s) {unknown}; known: {', '.join(TOPICS)}")
    out: list[Question] = []
    for name in names:
        if name in BUILDERS:
            questions = BUILDERS[name]()
        else:
            per = invented_per_topic if limit_per_topic is None else min(invented_per_topic,
                                                                         limit_per_topic)
            questions = build_invented(name, per, seed=seed)
        base = name.removesuffix("_invented")
        if base in PHRASINGS:
            questions = [rephrase(q, PHRASINGS[base], seed=seed) for q in questions]
        if limit_per_topic is not None and len(questions) > limit_per_topic:
            questions = sorted(random.Random(f"{seed}:{name}").sample(questions,
                                                                      limit_per_topic),
                               key=lambda q: q.id)
        out.extend(questions)
    return out


# ----------------------------------------------------------------------------- long form
LONGFORM_ATTRIBUTES = ("capital", "currency", "language")
LONGFORM_PROMPT = "Tell me about {name}: its capital, its currency and its languages."


LONGFORM_CITY_PROMPT = "Tell me about the time in {name}: its time zone and its offset from UTC."


@dataclass(frozen=True)
class LongformSubject:
    """A subject the long-form style asks about (a country, or a city's time in the
    held-out-only time-zone domain: ``family``), with every true value per attribute
    (empty for an invented one)."""

    entity: str
    name: str
    invented: bool
    values: dict[str, list[str]] = field(default_factory=dict)
    family: str = "longform_country"

    @property
    def prompt(self) -> str:
        template = LONGFORM_CITY_PROMPT if self.family == "longform_city" else LONGFORM_PROMPT
        return template.format(name=self.name)


@functools.lru_cache(maxsize=1)
def attribute_values() -> dict[str, dict[str, list[str]]]:
    """attribute -> country ISO -> its values, over every country (the "another entity's
    value" side of long-form claim labelling)."""
    out: dict[str, dict[str, list[str]]] = {a: {} for a in LONGFORM_ATTRIBUTES}
    for iso, c in countries_mod.countries().items():
        for attr, values in countries_mod.country_values(c).items():
            out[attr][iso] = values
    return out


def longform_subjects(n_real: int | None = None, n_invented: int = 30, *, seed: int = 0
                      ) -> list[LongformSubject]:
    """Held-out real countries (all, or ``n_real`` of them) and ``n_invented`` invented ones."""
    real = [LongformSubject(f"country:{c.iso}", c.name, False, countries_mod.country_values(c))
            for c in heldout_countries()]
    if n_real is not None and n_real < len(real):
        real = sorted(random.Random(f"longform:{seed}").sample(real, n_real),
                      key=lambda s: s.entity)
    fake = [LongformSubject(invented_entity(name), name, True)
            for name in invented_subjects("country", n_invented, seed=seed + 101)]
    return real + fake


__all__ = [
    "HELDOUT_ONLY_DOMAINS",
    "INVENTED_TOPICS",
    "PHRASINGS",
    "LONGFORM_ATTRIBUTES",
    "LONGFORM_CITY_PROMPT",
    "LONGFORM_PROMPT",
    "REAL_TOPICS",
    "TEMPLATES",
    "TOPICS",
    "LongformSubject",
    "attribute_values",
    "build_heldout",
    "domain_of",
    "heldout_countries",
    "invented_subjects",
    "longform_city_subjects",
    "longform_other_values",
    "longform_subjects",
]


# ----------------------------------------------------------------------------- long form, cities
def _city_values(c: domains_mod.CityZone) -> dict[str, list[str]]:
    return {"time zone": [*c.zone_names, *c.abbreviations],
            "utc offset": [f for h in c.offsets for f in domains_mod.offset_forms(h)]}


def longform_city_subjects(n_real: int = 30, n_invented: int = 30, *, seed: int = 0
                           ) -> list[LongformSubject]:
    """Cities of the time-zone pool the short topics do not ask about (``n_real``, in pool
    order) and ``n_invented`` invented ones, for the long form of a held-out-only domain."""
    pool = _city_pool()[2 * CITY_ZONE_TOPIC_SIZE:]
    real = [LongformSubject(f"city:{c.geonameid}", c.name, False, _city_values(c),
                            family="longform_city") for c in pool[:n_real]]
    fake = [LongformSubject(invented_entity(name), name, True, family="longform_city")
            for name in invented_subjects("city", n_invented, seed=seed + 303)]
    return real + fake


@functools.lru_cache(maxsize=1)
def _zone_values() -> dict[str, dict[str, list[str]]]:
    """attribute -> IANA zone -> its values, over every zone a GeoNames city uses."""
    out: dict[str, dict[str, list[str]]] = {"time zone": {}, "utc offset": {}}
    for c in domains_mod.city_zones():
        for attr, values in _city_values(c).items():
            out[attr].setdefault(c.zone, values)
    return out


def longform_other_values(family: str) -> dict[str, dict[str, list[str]]]:
    """The "another entity's value" side of long-form claim labelling for a family:
    other countries' capitals, currencies and languages, or other zones' names and
    offsets (a city's own values are checked first, so sharing a zone is no contrast)."""
    return _zone_values() if family == "longform_city" else attribute_values()
