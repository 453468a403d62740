"""Who the served model is, so a probe trained on one model is never applied to another.

The fingerprint is computed from the model folder alone (no weights are loaded), so the
plugin inside vLLM, the sidecar and the training pipeline all derive the same value
independently: the architecture-defining fields of ``config.json`` plus a digest of the
weight files (names, sizes and their first MiB, which holds the safetensors header and the
first tensors).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

# Fields of config.json that change what the residual stream means.
_ARCH_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_HEAD_BYTES = 1 << 20


class ModelIdentity(BaseModel):
    """The facts about a served model that a probe artifact must agree with."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    name: str
    fingerprint: str
    hidden_size: int
    num_layers: int


def _config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a model folder")
    return json.loads(path.read_text())


def model_fingerprint(model_dir: str | Path) -> str:
    """A short hex digest that changes when the architecture or the weights change."""
    model_dir = Path(model_dir)
    config = _config(model_dir)
    digest = hashlib.sha256()
    arch = {k: config.get(k) for k in _ARCH_FIELDS}
    digest.update(json.dumps(arch, sort_keys=True).encode())
    for path in sorted(model_dir.iterdir()):
        if path.suffix not in _WEIGHT_SUFFIXES or not path.is_file():
            continue
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as fh:
            digest.update(fh.read(_HEAD_BYTES))
    return digest.hexdigest()[:16]


def identify_model(model_dir: str | Path, name: str | None = None) -> ModelIdentity:
    """Read a local model folder's identity (name defaults to the folder name)."""
    model_dir = Path(model_dir)
    config = _config(model_dir)
    text = config.get("text_config", config)
    return ModelIdentity(
        name=name or model_dir.name,
        fingerprint=model_fingerprint(model_dir),
        hidden_size=int(text["hidden_size"]),
        num_layers=int(text["num_hidden_layers"]),
    )
