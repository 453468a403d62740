"""Layer choices, and the hook's settings (declared in :mod:`detector.settings`, with every
other environment variable; re-exported here for the callers that import them from here).
"""

from __future__ import annotations

from detector.settings import ENV_PREFIX, HookSettings, default_channel, parse_layers

__all__ = ["ENV_PREFIX", "HookSettings", "candidate_layers", "default_channel",
           "default_layers", "parse_layers"]


def default_layers(num_layers: int) -> list[int]:
    """A spread over the middle of the network, where factual recall is best separated."""
    picks = {round(num_layers * f) for f in (0.25, 0.5, 0.75)}
    return sorted(k for k in picks if 1 <= k < num_layers)


def candidate_layers(num_layers: int, *, most: int = 13) -> list[int]:
    """Layers a training capture records for the trainer to choose from: evenly spaced
    from about an eighth of the way in to two before the top, at most ``most`` of them
    (every second layer, 4..28, on the embedded 30-layer model; all of them on a model of
    four layers or fewer)."""
    first = max(1, round(num_layers * 2 / 15))
    last = max(first, num_layers - 1 if num_layers <= 4 else num_layers - 2)
    step = max(1, -(-(last - first) // (most - 1)))
    return list(range(first, last + 1, step))
