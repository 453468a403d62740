"""Turn a GGUF file or a Hugging Face model folder into a folder vLLM serves, and prove it is the same model.

A conversion can silently change what the model sees: transformers' GGUF loader ignores the file's
``tokenizer.ggml.add_bos_token``, so a converted tokenizer may add no BOS where llama.cpp adds one,
and the model then babbles. A next-token check compared through the *converted* tokenizer does not
see that, so verification here builds the source's inputs the way the source defines them (the GGUF
metadata, or the source folder's own tokenizer), greedily generates a few prompts through the source
and through the output, and names what differs.

Imports are idempotent and safe to run concurrently: a file lock per output folder, the new folder
built beside its final place and renamed in one step, and a marker file (``lie-detector-model.json``,
the same marker ``model prepare`` writes) tying the folder to the source's fingerprint and the tool
version. When the marker matches, nothing heavy (torch, transformers) is imported.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from detector.models.gguf_header import GGUFHeaderError, read_header
from detector.models.gguf_reading import gguf_read_once

log = logging.getLogger(__name__)

MARKER_FILE = "lie-detector-model.json"
MARKER_VERSION = 1
# Bump when the conversion changes what it writes: older imports are then redone. Markers written
# before this field existed (the first `model prepare`) count as version 1.
TOOL_VERSION = 1

GGUF_MAGIC = b"GGUF"
# config.json, tokenizer_config.json and weight indexes are kilobytes; a bigger one is not a model's.
MAX_JSON_BYTES = 16 << 20
# No released model has more decoder layers; more in a config is a lie (or a typo).
MAX_LAYERS = 4096
VERIFY_PROMPTS = (
    "The capital of France is",
    "Q: What is 2 + 3?\nA:",
    "Once upon a time, there was a",
    "def fibonacci(n):",
)
VERIFY_NEW_TOKENS = 8
# Models smaller than this generate the verification prompts on one thread (_generation_threads).
SINGLE_THREAD_PARAMS = 1_000_000_000
NO_CHAT_TEMPLATE = "no chat template: the `chat` prompt style will be skipped"

# Weight formats other than safetensors; never copied into the output folder.
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

SourceKind = Literal["gguf", "hf-folder"]


class ModelImportError(RuntimeError):
    """The source is not a usable model, or it could not be converted."""


class VerificationError(ModelImportError):
    """The output folder does not behave like its source; ``report`` holds every check."""

    def __init__(self, message: str, report: ImportReport) -> None:
        super().__init__(message)
        self.report = report


class Check(BaseModel):
    """One verification finding, named so a user knows what to fix."""

    name: str
    status: Literal["ok", "warning", "failed"]
    message: str


class ImportReport(BaseModel):
    """What an import did and what its verification found."""

    model_config = ConfigDict(frozen=True)

    source: Path
    out: Path
    kind: SourceKind
    already_imported: bool = False
    verified: bool = False
    checks: list[Check] = []

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "failed"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warning"]


# --- the source: what it is and its fingerprint --------------------------------------------------


def source_kind(source: Path) -> SourceKind:
    """Classify ``source`` or raise a one-line :class:`ModelImportError` saying what is wrong."""
    if not source.exists():
        raise ModelImportError(f"{source} does not exist")
    if source.is_file():
        with source.open("rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ModelImportError(f"{source} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
        try:
            read_header(source)  # before gguf.GGUFReader trusts its counts and lengths
        except GGUFHeaderError as exc:
            raise ModelImportError(str(exc)) from None
        return "gguf"
    if not (source / "config.json").is_file():
        ggufs = sorted(p.name for p in source.glob("*.gguf"))
        hint = f" (it holds {', '.join(ggufs)}: pass the file)" if ggufs else ""
        raise ModelImportError(f"{source} is not a Hugging Face model folder: it has no config.json{hint}")
    read_json_object(source / "config.json")
    if not _weight_files(source) and not _legacy_weight_files(source):
        raise ModelImportError(f"{source} has no weights (*.safetensors or pytorch_model*.bin)")
    if not any((source / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelImportError(f"{source} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return "hf-folder"


def read_json_object(path: Path, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A small JSON object file (config.json, an index), or a one-line ModelImportError."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise ModelImportError(f"{path}: {size} bytes, more than the {limit} a model's "
                                   f"{path.name} could need")
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelImportError(f"{path} is not JSON: {_one_line(exc)}") from None
    except OSError as exc:
        raise ModelImportError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(doc, dict):
        raise ModelImportError(f"{path} must hold a JSON object, not {type(doc).__name__}")
    return doc


def _one_line(exc: BaseException) -> str:
    """An exception as one short line: its type and its message's first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else '(no message)'}"


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _legacy_weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("pytorch_model*.bin") if p.is_file())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of the folder's files: cheap even for a 100 GB checkpoint."""
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_fingerprint(source: Path, kind: SourceKind, *, sha256: str | None = None) -> dict[str, Any]:
    """What the marker records about the source. A GGUF is hashed in full (about 1 s/GB)."""
    if kind == "gguf":
        stat = source.stat()
        return {
            "kind": kind, "name": source.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": sha256 or sha256_file(source),
        }
    return {"kind": kind, "name": source.name, "fingerprint": _folder_fingerprint(source)}


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return read_json_object(folder / MARKER_FILE)
    except ModelImportError:
        return None


def marker_matches(out: Path, source: Path, *, sha256: str | None = None) -> bool:
    """True if ``out`` is a complete import of ``source`` by this tool version (cheap, no torch).

    A GGUF matches on name and size, then on its mtime or, failing that, its content hash (taken
    from ``sha256`` when the caller already has it), so a reinstalled but identical file still
    matches and an unchanged one is not hashed again.
    """
    marker = read_marker(out)
    if not marker or marker.get("marker_version") != MARKER_VERSION:
        return False
    if marker.get("tool_version", 1) != TOOL_VERSION:
        return False
    if not (out / "config.json").is_file() or not _weight_files(out):
        return False
    recorded = marker.get("source", {})
    if source.is_file():
        stat = source.stat()
        if recorded.get("name") != source.name or recorded.get("size") != stat.st_size:
            return False
        if recorded.get("mtime_ns") == stat.st_mtime_ns:
            return True
        return recorded.get("sha256") == (sha256 or sha256_file(source))
    return source.is_dir() and recorded.get("fingerprint") == _folder_fingerprint(source)


# --- the import ----------------------------------------------------------------------------------


def import_model(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    verify: bool = True,
    name: str | None = None,
    source_extra: dict[str, Any] | None = None,
    expect_config: dict[str, Any] | None = None,
    replace_unmarked: bool = False,
) -> ImportReport:
    """Convert ``source`` (a ``.gguf`` file or a Hugging Face folder) into a served-ready ``out``.

    Returns at once when ``out`` already holds an import of the same source. Otherwise converts under
    a lock into a temporary sibling folder, verifies it against the source (unless ``verify`` is
    false; the cheap tokenizer checks, and the weights' shapes against config.json, run anyway) and
    renames it into place. Raises :class:`VerificationError` when a check fails, leaving ``out`` as
    it was, and :class:`ModelImportError` (one line) for anything else that stops the import.

    An existing ``out`` is replaced only when everything in it is what an earlier import wrote (the
    marker lists those files with their hashes): a user's file or folder in it, a changed file, or
    ``out`` being a file stops the import instead. ``replace_unmarked`` (the embedded model's own
    cache folder) replaces whatever is there.

    ``name`` goes into the marker (default: the output folder's name, as ``identify_model`` uses),
    ``source_extra`` is added to the marker's ``source`` record, ``expect_config`` lists config.json
    fields the output must have (e.g. a known hidden size).
    """
    source = Path(source).expanduser().resolve()
    out = Path(out).expanduser().resolve()
    try:
        return _import(source, out, progress=progress, verify=verify, name=name,
                       source_extra=source_extra, expect_config=expect_config,
                       replace_unmarked=replace_unmarked)
    except ModelImportError:
        raise
    except OSError as exc:
        where = exc.filename or out
        raise ModelImportError(f"cannot import {source} into {out}: {where}: "
                               f"{exc.strerror or exc}") from exc
    except Exception as exc:  # a library's refusal of a file it cannot read, whatever its type
        raise ModelImportError(f"cannot import {source}: {_one_line(exc)}") from exc


def _import(source: Path, out: Path, *, progress: bool, verify: bool, name: str | None,
            source_extra: dict[str, Any] | None, expect_config: dict[str, Any] | None,
            replace_unmarked: bool) -> ImportReport:
    kind = source_kind(source)
    if out == source or source in out.parents or out in source.parents:
        raise ModelImportError(f"the output folder {out} must not contain or be inside the source {source}")
    _check_out_path(out)
    if marker_matches(out, source):
        return _already_imported(source, out, kind)
    if not replace_unmarked:
        _check_replaceable(out)
    if kind == "hf-folder" and _weight_files(source):
        check_weights_match_config(source)  # before copying gigabytes of them

    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    steps = 4 if verify else 3
    bar_options: dict[str, Any] = {"total": steps, "desc": f"import {out.name}", "unit": "step",
                                   "disable": not progress}
    # Log lines go through tqdm.write so they do not tear the bar apart.
    with _locked(out), logging_redirect_tqdm(), tqdm(**bar_options) as bar:
        bar.set_postfix_str("fingerprint source")
        fingerprint = source_fingerprint(source, kind)
        # Another process may have finished while we waited for the lock.
        if marker_matches(out, source, sha256=fingerprint.get("sha256")):
            bar.update(bar.total - bar.n)
            return _already_imported(source, out, kind)
        _remove_stale_temporaries(out, wholesale=replace_unmarked)
        bar.update()
        log.info("importing %s (%s) into %s", source, kind, out)

        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            with _quiet_transformers_progress():
                checks, dtype = _convert_and_verify(source, kind, tmp, bar, verify=verify)
            checks += _config_checks(tmp, expect_config or {})
            report = ImportReport(source=source, out=out, kind=kind, verified=verify, checks=checks)
            for check in report.warnings:
                log.warning("%s: %s", check.name, check.message)
            if report.failures:
                raise VerificationError(_failure_message(source, report), report)
            _write_marker(tmp, name or out.name, fingerprint | (source_extra or {}), dtype, report)
            _make_readable(tmp)
            _replace_dir(tmp, out, wholesale=replace_unmarked)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bar.set_postfix_str("done")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    log.info("model ready at %s (%.0f MiB)", out, size / 2**20)
    return report


def _check_out_path(out: Path) -> None:
    """``out`` must be a folder or not exist yet, and its nearest existing ancestor a folder."""
    if out.exists() and not out.is_dir():
        raise ModelImportError(f"{out} exists and is not a folder; choose another --out")
    for ancestor in out.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ModelImportError(f"cannot write {out}: {ancestor} is a file, not a folder")
            return


def _written_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` but the marker, with its size and hash: what an import wrote."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER_FILE}


def _foreign_entries(folder: Path) -> list[str] | None:
    """What in ``folder`` an earlier import did not write, or changed since (its marker's
    ``files``); None when there is no marker or it lists no files (an older version's)."""
    marker = read_marker(folder)
    files = marker.get("files") if marker else None
    if not isinstance(files, dict):
        return None
    parents = {parent.as_posix() for rel in files for parent in Path(rel).parents}
    foreign = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == MARKER_FILE and path.is_file() and not path.is_symlink():
            continue
        if path.is_dir() and not path.is_symlink():
            if rel not in parents:
                foreign.append(rel + "/")
            continue
        record = files.get(rel)
        if (path.is_symlink() or not path.is_file() or not isinstance(record, dict)
                or record.get("size") != path.stat().st_size
                or record.get("sha256") != sha256_file(path)):
            foreign.append(rel)
    return foreign


def _check_replaceable(out: Path) -> None:
    """Refuse, in one line, to replace a folder holding anything an import did not write."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = _foreign_entries(out)
    if foreign is None:
        if read_marker(out) is None:
            raise ModelImportError(f"{out} exists, is not empty and was not written by lie-detector; "
                                   "remove it or choose another --out")
        raise ModelImportError(f"{out} was written by an older lie-detector that did not record its "
                               "files, so what else it holds is unknown; remove it or choose another --out")
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ModelImportError(f"{out} holds files lie-detector did not write or that changed since "
                               f"({shown}); move them out or choose another --out")


def _already_imported(source: Path, out: Path, kind: SourceKind) -> ImportReport:
    marker = read_marker(out) or {}
    checks = [Check.model_validate(c) for c in marker.get("checks", [])]
    log.info("already imported: %s is up to date with %s", out, source)
    return ImportReport(source=source, out=out, kind=kind, already_imported=True,
                        verified=bool(marker.get("verified", False)), checks=checks)


def _failure_message(source: Path, report: ImportReport) -> str:
    lines = [f"verification of the import of {source} failed:"]
    lines += [f"  {c.name}: {c.message}" for c in report.failures]
    return "\n".join(lines)


def _write_marker(folder: Path, name: str, source: dict[str, Any], dtype: str, report: ImportReport) -> None:
    import torch
    import transformers

    marker = {
        "marker_version": MARKER_VERSION,
        "tool_version": TOOL_VERSION,
        "model": name,
        "source": source,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": dtype,
        "verified": report.verified,
        "checks": [c.model_dump() for c in report.checks],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # What a later import may remove: these files, as written, and nothing else.
        "files": _written_files(folder),
    }
    # Written last: its presence means the folder is complete and verified.
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


# --- conversion ----------------------------------------------------------------------------------


@dataclass
class _Reference:
    """How the source behaves on the verification prompts, computed before the output is loaded."""

    input_ids: list[list[int]]
    continuations: list[list[int]]
    adds_bos: bool
    bos: str
    has_eos: bool
    decode: Callable[[Sequence[int]], str]


def _convert_and_verify(
    source: Path, kind: SourceKind, tmp: Path, bar: Any, *, verify: bool,
) -> tuple[list[Check], str]:
    """Write the output into ``tmp`` and return the checks of it against the source, and its dtype."""
    if kind == "gguf":
        bar.set_postfix_str("load GGUF (dequantise)")
        model, tokenizer, encode, checks = load_gguf(source)
        bar.update()
        bar.set_postfix_str("run source")
        reference = _reference(model, tokenizer, encode, generate=verify)
        bar.set_postfix_str("save safetensors")
        save_dequantised(model, tokenizer, tmp)
        check_weights_match_config(tmp)
        dtype = "float32"
        del model
    else:
        bar.set_postfix_str("copy" if _weight_files(source) else "convert to safetensors")
        dtype = copy_hf_folder(source, tmp)
        check_weights_match_config(tmp)  # before anything loads them
        checks = []
        bar.update()
        bar.set_postfix_str("run source" if verify else "load source tokenizer")
        model = _load_model(source) if verify else None
        tokenizer = _load_tokenizer(source)
        reference = _reference(model, tokenizer, lambda p: tokenizer(p).input_ids, generate=verify)
        del model
    _ensure_generation_config(tmp)
    bar.update()

    bar.set_postfix_str("verify" if verify else "check tokenizer")
    checks += check_output(tmp, reference, generate=verify)
    if verify:
        bar.update()
    return checks, dtype


def _dtype_kwarg(torch_dtype: Any) -> dict[str, Any]:
    """transformers renamed ``torch_dtype`` to ``dtype`` (4.56); use whichever it expects."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch_dtype}


def _load_model(folder: Path, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = _dtype_kwarg("auto") | kwargs
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def gguf_token_flags(path: Path) -> dict[str, Any]:
    """The GGUF's own word on special tokens: ``add_bos``/``add_eos`` (None when the file is silent),
    the tokenizer model (``gpt2``, ``llama``, ...), and the BOS/EOS ids."""
    import gguf

    reader = gguf.GGUFReader(path)
    wanted = {
        "add_bos": "tokenizer.ggml.add_bos_token", "add_eos": "tokenizer.ggml.add_eos_token",
        "model": "tokenizer.ggml.model", "bos_id": "tokenizer.ggml.bos_token_id",
        "eos_id": "tokenizer.ggml.eos_token_id",
    }
    flags: dict[str, Any] = {}
    for key, field_name in wanted.items():
        field = reader.get_field(field_name)
        flags[key] = field.contents() if field is not None else None
    return flags


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS token first when encoding plain text."""
    ids = tokenizer("hi").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def adds_eos(tokenizer: Any) -> bool:
    ids = tokenizer("hi").input_ids
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def load_gguf(path: Path) -> tuple[Any, Any, Callable[[str], list[int]], list[Check]]:
    """Load a GGUF with transformers (dequantised to float32) and fix its tokenizer's BOS/EOS.

    Returns the model, the tokenizer (now adding BOS/EOS as the file says), the source's own
    encoding (from the file's metadata, independent of that fix) and the checks about it.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    # transformers opens the file three times and gguf_token_flags a fourth: parse it once.
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **_dtype_kwarg(torch.float32))
        flags = gguf_token_flags(path)
    model.eval()
    log.info("loaded %s in %.1f s (transformers %s)", path.name, time.monotonic() - t0, transformers.__version__)

    if flags["add_bos"] is None and flags["model"] == "llama":
        flags["add_bos"] = True  # llama.cpp's default for sentencepiece vocabularies
    want_bos = adds_bos(tokenizer) if flags["add_bos"] is None else bool(flags["add_bos"])
    want_eos = adds_eos(tokenizer) if flags["add_eos"] is None else bool(flags["add_eos"])
    checks: list[Check] = []
    if flags["add_bos"] is None:
        checks.append(Check(name="bos_flag", status="warning", message=(
            "the GGUF does not say whether to add a BOS token; kept transformers' behaviour "
            f"(adds BOS: {'yes' if want_bos else 'no'})")))

    def encode(prompt: str) -> list[int]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        bos = [tokenizer.bos_token_id] if want_bos and tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if want_eos and tokenizer.eos_token_id is not None else []
        return bos + list(ids) + eos

    carry_special_token_flags(tokenizer, add_bos=want_bos, add_eos=want_eos)
    return model, tokenizer, encode, checks


def carry_special_token_flags(tokenizer: Any, *, add_bos: bool, add_eos: bool) -> None:
    """Make the tokenizer add BOS/EOS as the GGUF says; transformers' GGUF loader drops these flags.

    Only a tokenizer that disagrees is touched, so one that already behaves keeps its post-processor
    byte for byte. The setter rewrites the post-processor, which ``save_pretrained`` stores in
    ``tokenizer.json`` (what vLLM loads).
    """
    if adds_bos(tokenizer) != add_bos:
        log.info("GGUF says add_bos_token=%s; setting it on the converted tokenizer", add_bos)
        tokenizer.add_bos_token = add_bos
    if adds_eos(tokenizer) != add_eos:
        log.info("GGUF says add_eos_token=%s; setting it on the converted tokenizer", add_eos)
        tokenizer.add_eos_token = add_eos


def save_dequantised(model: Any, tokenizer: Any, out: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder.

    The GGUF loader marks the model as quantised; a plain float32 folder must not say so, or
    save_pretrained refuses / vLLM looks for a GGUF quantisation method.
    """
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def copy_hf_folder(source: Path, out: Path) -> str:
    """Copy a safetensors folder as it is, or convert ``pytorch_model*.bin`` weights to safetensors.

    Returns the weights' dtype as config.json states it. Other weight formats, sub-folders and
    hidden files are left behind.
    """
    index = source / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map", {})
        if not isinstance(weight_map, dict):
            raise ModelImportError(f"{index}: weight_map must be an object")
        shards = {str(v) for v in weight_map.values()}
        missing = sorted(s for s in shards if not (source / s).is_file())
        if missing:
            raise ModelImportError(f"{source} is missing weight shards listed in its index: {', '.join(missing)}")
    legacy = not _weight_files(source)
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name == MARKER_FILE:
            continue
        if path.suffix in _OTHER_WEIGHTS or path.name.endswith(".bin.index.json"):
            continue
        shutil.copy2(path, out / path.name)
    if legacy:
        # transformers reads .bin with torch.load(weights_only=True), which refuses code in the file.
        log.info("converting %s to safetensors", ", ".join(p.name for p in _legacy_weight_files(source)))
        _load_model(source).save_pretrained(out, safe_serialization=True)
    config = read_json_object(out / "config.json")
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def check_weights_match_config(folder: Path) -> None:
    """config.json must describe the weights beside it, whether or not generation is verified:
    a config whose sizes lie makes a folder vLLM fails to load (or loads as another model).

    The model the config describes is built on the meta device (no memory) and every
    parameter the safetensors files also hold must have the same shape there; the layer
    count is checked first against the weights' ``layers.N`` names, so a lying count never
    builds millions of modules.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    shapes: dict[str, tuple[int, ...]] = {}
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), "pt") as weights:
                for key in weights.keys():
                    shapes[key] = tuple(weights.get_slice(key).get_shape())
        except Exception as exc:  # the library's refusal, whatever its type
            raise ModelImportError(f"{path.name} is not a readable safetensors file: "
                                   f"{_one_line(exc)}") from None
    config = AutoConfig.from_pretrained(folder)
    layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    held = {int(m.group(1)) for key in shapes if (m := re.search(r"\.layers\.(\d+)\.", key))}
    if type(layers) is not int or not 0 < layers <= MAX_LAYERS or (held and layers != len(held)):
        raise ModelImportError(f"config.json says num_hidden_layers {layers!r} but the weights "
                               f"hold {len(held)} layers")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = f"{model.base_model_prefix}."
    expected |= {k.removeprefix(prefix): v for k, v in expected.items() if k.startswith(prefix)}
    common = sorted(set(shapes) & set(expected))
    if not common:
        raise ModelImportError(f"the weights' tensor names match none of the parameters of the "
                               f"{type(model).__name__} config.json describes")
    wrong = [k for k in common if shapes[k] != expected[k]]
    if wrong:
        first = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelImportError(f"config.json does not match the weights: {first} is "
                               f"{list(shapes[first])} in the weights but the config makes it "
                               f"{list(expected[first])}{more}")


def _ensure_generation_config(folder: Path) -> None:
    """vLLM reads EOS and sampling defaults from generation_config.json; derive one if missing."""
    if (folder / "generation_config.json").is_file():
        return
    from transformers import AutoConfig, GenerationConfig

    GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder)).save_pretrained(folder)


# --- verification --------------------------------------------------------------------------------


def _greedy(model: Any, input_ids: list[int], eos_token_id: Any) -> list[int]:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=VERIFY_NEW_TOKENS, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id if isinstance(eos_token_id, int) else 0,
    )
    ids = torch.tensor([input_ids])
    with torch.no_grad(), _generation_threads(model):
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return generated[0, len(input_ids):].tolist()


@contextlib.contextmanager
def _generation_threads(model: Any) -> Iterator[None]:
    """Generate a small model's verification tokens on one thread.

    A short prompt through a model under ``SINGLE_THREAD_PARAMS`` parameters is a chain of small
    matrix products: intra-op parallelism gains little on a quiet machine, and on a busy one each
    parallel region waits for a descheduled thread. The 135M embedded model's four prompts took
    2.3 s (2.2 s CPU) on one thread and 6.7-18 s (7-14 s CPU) on two, on a loaded 2-core machine;
    the source and the output are both generated this way, so the check compares like with like.
    Larger models keep torch's setting.
    """
    import torch

    small = sum(p.numel() for p in model.parameters()) < SINGLE_THREAD_PARAMS
    saved = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(saved)


def _eos_id(model: Any, tokenizer: Any) -> Any:
    generation = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(generation, "eos_token_id", None)
    return eos if eos is not None else tokenizer.eos_token_id


def _reference(model: Any, tokenizer: Any, encode: Callable[[str], list[int]], *, generate: bool) -> _Reference:
    input_ids = [list(encode(p)) for p in VERIFY_PROMPTS]
    eos = _eos_id(model, tokenizer)
    continuations = [_greedy(model, ids, eos) for ids in input_ids] if generate else []
    bos_id = tokenizer.bos_token_id
    return _Reference(
        input_ids=input_ids,
        continuations=continuations,
        adds_bos=bos_id is not None and all(ids[:1] == [bos_id] for ids in input_ids),
        bos=f"{tokenizer.bos_token!r} (id {bos_id})",
        has_eos=eos is not None,
        decode=lambda ids: tokenizer.decode(ids),
    )


def check_output(out: Path, reference: _Reference, *, generate: bool = True) -> list[Check]:
    """Check the folder ``out`` against the source's behaviour; each finding names what is wrong."""
    tokenizer = _load_tokenizer(out)
    model = _load_model(out) if generate else None
    checks = [_bos_check(tokenizer, reference), _eos_check(model, tokenizer, reference)]
    if tokenizer.chat_template:
        checks.append(Check(name="chat_template", status="ok", message="chat template present"))
    else:
        checks.append(Check(name="chat_template", status="warning", message=NO_CHAT_TEMPLATE))

    output_ids = [list(tokenizer(p).input_ids) for p in VERIFY_PROMPTS]
    differs = [(p, a, b) for p, a, b in zip(VERIFY_PROMPTS, reference.input_ids, output_ids) if a != b]
    if differs:
        prompt, want, got = differs[0]
        checks.append(Check(name="tokenizer", status="failed", message=(
            f"the output tokenizes {prompt!r} as {got}, the source as {want}")))
    else:
        checks.append(Check(name="tokenizer", status="ok",
                            message=f"{len(VERIFY_PROMPTS)} prompts tokenize the same"))
    if generate:
        checks.append(_generation_check(model, tokenizer, output_ids, reference))
    return checks


def _bos_check(tokenizer: Any, reference: _Reference) -> Check:
    output_adds = adds_bos(tokenizer)
    if output_adds == reference.adds_bos:
        state = f"add BOS {reference.bos}" if output_adds else "add no BOS"
        return Check(name="bos", status="ok", message=f"source and output both {state}")
    if reference.adds_bos:
        message = (f"BOS lost: the source adds BOS {reference.bos} before every prompt, "
                   "the output's tokenizer adds none (the model will babble)")
    else:
        message = (f"BOS added: the output's tokenizer adds BOS {tokenizer.bos_token!r} "
                   f"(id {tokenizer.bos_token_id}), the source adds none")
    return Check(name="bos", status="failed", message=message)


def _eos_check(model: Any, tokenizer: Any, reference: _Reference) -> Check:
    eos = _eos_id(model, tokenizer)
    if eos is None and model is None:
        from transformers import GenerationConfig

        with contextlib.suppress(OSError):
            eos = GenerationConfig.from_pretrained(tokenizer.name_or_path).eos_token_id
    if eos is not None:
        return Check(name="eos", status="ok", message=f"EOS token id {eos}")
    status: Literal["warning", "failed"] = "failed" if reference.has_eos else "warning"
    where = "the source has one" if reference.has_eos else "the source has none either"
    return Check(name="eos", status=status,
                 message=f"EOS token absent ({where}): generation would only stop at max_tokens")


def _generation_check(model: Any, tokenizer: Any, output_ids: list[list[int]], reference: _Reference) -> Check:
    eos = _eos_id(model, tokenizer)
    for prompt, ids, want in zip(VERIFY_PROMPTS, output_ids, reference.continuations):
        got = _greedy(model, ids, eos)
        if got != want:
            return Check(name="generation", status="failed", message=(
                f"greedy generation differs on {prompt!r}: source -> {reference.decode(want)!r} {want}, "
                f"output -> {tokenizer.decode(got)!r} {got}"))
    return Check(name="generation", status="ok", message=(
        f"greedy generation of {len(VERIFY_PROMPTS)} prompts ({VERIFY_NEW_TOKENS} tokens) matches the source"))


def _config_checks(folder: Path, expect: dict[str, Any]) -> list[Check]:
    if not expect:
        return []
    config = read_json_object(folder / "config.json")
    config = config.get("text_config", config)
    wrong = {k: config.get(k) for k, v in expect.items() if config.get(k) != v}
    if not wrong:
        return [Check(name="config", status="ok", message=f"config has {expect}")]
    return [Check(name="config", status="failed", message=f"config has {wrong}; expected {expect}")]


def verify_model(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> list[Check]:
    """Check an existing output folder against its source (both loaded; no conversion)."""
    source, out = Path(source).resolve(), Path(out).resolve()
    kind = source_kind(source)
    if kind == "gguf":
        model, tokenizer, encode, checks = load_gguf(source)
    else:
        model, tokenizer = _load_model(source), _load_tokenizer(source)
        checks = []

        def encode(prompt: str) -> list[int]:
            return tokenizer(prompt).input_ids
    reference = _reference(model, tokenizer, encode, generate=True)
    del model
    return checks + check_output(out, reference)


# --- files and locks -----------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """Serialise imports into one folder across this user's processes (``fcntl.flock``).

    The lock file lives in a per-user folder under the temporary directory, not beside
    ``target``: an import leaves nothing in the user's folders but ``target`` itself.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    locks = Path(tempfile.gettempdir()) / f"lie-detector-{os.getuid()}" / "import-locks"
    locks.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = locks / f"{hashlib.sha256(str(target).encode()).hexdigest()[:32]}.lock"
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is writing %s; waiting for it", target)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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


def _remove_stale_temporaries(target: Path, *, wholesale: bool = False) -> None:
    """Delete leftovers of imports that crashed (safe: we hold the lock). A ``.tmp-`` folder is
    all ours; a ``.old-`` one was the user's ``target`` and loses only what an import wrote."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        log.info("removing leftover %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in target.parent.glob(f".{target.name}.old-*"):
        if wholesale:
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            _remove_written(leftover)


def _remove_written(folder: Path) -> None:
    """Remove an earlier import's output: the files its marker lists, as written, then the
    folders they leave empty. Anything else found there keeps the whole folder, with a warning."""
    if not any(folder.iterdir()):
        folder.rmdir()
        return
    foreign = _foreign_entries(folder)
    if foreign is None or foreign:
        log.warning("kept %s: it holds files lie-detector did not write (%s)", folder,
                    ", ".join((foreign or ["no file list"])[:3]))
        return
    # What is there, each file just checked against the list (never a path the marker names:
    # a tampered one could name "../elsewhere").
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir():
            with contextlib.suppress(OSError):
                path.rmdir()
        else:
            path.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _replace_dir(new: Path, target: Path, *, wholesale: bool = False) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is moved aside first, then what an
    import wrote in it removed (all of it when ``wholesale``)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(new, target)
    if old is None:
        return
    if wholesale:
        shutil.rmtree(old, ignore_errors=True)
    else:
        _remove_written(old)
