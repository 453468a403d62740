"""Which entities are held out of training: a pure function of the entity key.

Held-out evaluation is only honest if no fact about a held-out entity can reach a
training set. Choosing by a stable hash of the entity key (``country:FR``,
``element:26``, ``state:TX``, ``invented:norvania``) needs no list to keep in sync and no
dataset to build: :func:`probes.datasets.registry.build_dataset` drops every question
whose entity is held out, and the invented-name generator skips held-out names, so the
split holds by construction, for every topic added later too.

Entities used as few-shot examples in training prompts are never held out (their names
appear in every training prompt of that topic).
"""

from __future__ import annotations

import hashlib

# Percentage of each entity kind held out. Invented names are hashed too, so the
# held-out topics' invented subjects can never be generated for training.
HELDOUT_PERCENT: dict[str, int] = {"country": 20, "element": 20, "state": 20, "invented": 20,
                                   # held-out-only domains (time zones, units): every one
                                   "city": 100, "unit": 100}
_SALT = "heldout-v1"


def _shot_entities() -> set[str]:
    """Entities named in training few-shot examples (imported lazily: knowledge bases)."""
    from probes.datasets import countries, elements, us_states
    from probes.datasets.sources import element_rows, import_package

    out = {f"country:{iso}" for iso in countries.SHOT_COUNTRIES}
    out |= {f"element:{r['atomic_number']}" for r in element_rows()
            if r["name"] in elements._SHOT_ELEMENTS}
    out |= {f"state:{s.abbr}" for s in import_package("us").STATES
            if s.name in us_states._SHOT_STATES}
    return out


def _bucket(entity: str) -> int:
    digest = hashlib.sha256(f"{_SALT}:{entity}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100


_SHOTS: set[str] | None = None


def is_heldout_entity(entity: str) -> bool:
    """Whether ``entity`` (``kind:key``) belongs to the held-out evaluation set."""
    global _SHOTS
    kind, _, key = entity.partition(":")
    percent = HELDOUT_PERCENT.get(kind, 0)
    if not key or percent <= 0 or _bucket(entity) >= percent:
        return False
    if kind == "invented":
        return True
    if _SHOTS is None:
        _SHOTS = _shot_entities()
    return entity not in _SHOTS


def invented_entity(name: str) -> str:
    """The entity key of an invented name (as :mod:`probes.datasets.invented` spells it)."""
    return f"invented:{name.casefold()}"


__all__ = ["HELDOUT_PERCENT", "invented_entity", "is_heldout_entity"]
