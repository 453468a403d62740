"""Settings read from the environment, validated once at start-up.

The hook runs inside vLLM's processes, where the only way in is the environment; the
sidecar reads the same channel address from the same variable, so one
``LIE_DETECTOR_CHANNEL`` wires the two together.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detector.hooks.token_features import parse_token_features

ENV_PREFIX = "LIE_DETECTOR_"


def default_channel() -> str:
    """An IPC endpoint in a per-user directory that only its owner can enter."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return f"ipc://{Path(base) / f'lie-detector-{os.getuid()}' / 'channel.sock'}"


def parse_layers(value: str | list[int] | None) -> list[int] | None:
    """``"8,15,22"`` -> ``[8, 15, 22]`` (sorted, unique); empty -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(" ", ",").split(",") if p.strip()]
        if not parts:
            return None
        try:
            value = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"layers must be integers separated by commas, got {value!r}")
    return sorted(set(int(v) for v in value))


class HookSettings(BaseSettings):
    """What the in-engine hook does. Every field is ``LIE_DETECTOR_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    disable: bool = Field(False, description="Turn the plugin off completely.")
    channel: str = Field(default_factory=default_channel)
    # The deployment's channel key (``detector.channel.auth``), presented to the sidecar.
    channel_key_file: str | None = None
    # None: a default spread of layers chosen for the model at load time.
    layers: str | None = None
    queue_steps: int = Field(1024, ge=1, le=65536)
    queue_bytes: int = Field(256 << 20, ge=1 << 16)
    heartbeat_s: float = Field(1.0, gt=0, le=60)
    # "logprob,entropy": per-token features computed from each step's logits for hybrid
    # probes (set from the probes' declarations); empty, the default, computes nothing.
    token_features: str | None = None

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: str | None) -> str | None:
        parse_layers(value)
        return value

    @field_validator("token_features")
    @classmethod
    def _check_token_features(cls, value: str | None) -> str | None:
        parse_token_features(value)
        return value

    @property
    def token_feature_list(self) -> list[str]:
        return parse_token_features(self.token_features)

    @property
    def layer_list(self) -> list[int] | None:
        return parse_layers(self.layers)


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
