"""The probe artifact: what training writes and the sidecar loads.

A probe artifact is a directory ``<name>/`` holding exactly two files that are read:

* ``probe.json`` - :class:`ProbeMetadata` (which model, which layers, how to calibrate);
* ``probe.safetensors`` - the float32 tensors ``weight``, ``bias`` and optionally
  ``mean``/``scale`` (standardisation) and ``isotonic_x``/``isotonic_y`` (calibration).

Probes are shared between machines and teams, so loading one must never execute code:
nothing here unpickles (no ``torch.load``, no ``pickle``), other files in the directory
are ignored, and every inconsistency raises :class:`ProbeArtifactError` with a reason
that names the file, so an operator can fix a bad probe without reading a traceback.

Score of a token position with captured rows ``x`` (the probe's layers concatenated in
``layers`` order, length ``len(layers) * hidden_size``), followed, for a *hybrid* probe,
by the scored token's ``token_features`` (``detector.engine.token_features``: its raw
log-probability, the entropy of its top-20 distribution) in the order the metadata lists::

    z = (([x, f] - mean) / scale) . weight + bias   # the logit; f is empty for most probes
    p = calibrate(z)                                 # none | platt | isotonic
    flagged = p >= threshold
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from detector import __version__
from detector.drift import DRIFT_TENSORS, DriftSummary, check_drift_tensors
from detector.engine.token_features import TOKEN_FEATURES, TOKEN_FEATURES_ENV
from detector.model_identity import ModelIdentity
from detector.verdict import VerdictModel

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_FILE = "probe.json"
TENSORS_FILE = "probe.safetensors"
LAYERS_ENV = "LIE_DETECTOR_LAYERS"

# Sanity caps: a real probe is kilobytes to tens of MiB; refuse to slurp anything huge.
MAX_TENSORS_BYTES = 1 << 30
# A probe's JSON is small: the shipped probe.json is 2.5 KiB (about 40 arrays and objects,
# 6 levels deep), a safetensors header under 1 KiB. json.loads of a few MiB of ``[],[],..``
# builds millions of objects (seconds and GiBs, issue 23), so size, nesting and token counts
# are bounded on the raw bytes before anything is parsed.
MAX_METADATA_BYTES = 1 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MAX_JSON_CONTAINERS = 10_000  # '[' and '{', strings included: an overestimate
MAX_JSON_TOKENS = 200_000  # '"', '\\', ',' and ':'

REQUIRED_TENSORS = ("weight", "bias")
OPTIONAL_TENSORS = ("mean", "scale", "isotonic_x", "isotonic_y") + DRIFT_TENSORS
_PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".joblib", ".ckpt"}
# Byte width of each safetensors dtype, to check a header before handing it to the library.
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


class ProbeArtifactError(ValueError):
    """A probe artifact is missing, malformed or inconsistent; the message says why."""


class ProbeMismatchError(ProbeArtifactError):
    """A valid probe that cannot be applied to the served model or the captured layers."""


class ProbePathError(ProbeArtifactError):
    """A probe path outside the folders this process may read probes from."""


class ProbeMetadata(BaseModel):
    """``probe.json``: everything needed to apply the tensors correctly, and their provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    model: ModelIdentity
    layers: list[int] = Field(min_length=1)
    hidden_size: int = Field(gt=0)
    # producer: the row at p-1 (whose output distribution chose token p) scores token p;
    # own: the row at p (after the model has read token p) scores token p.
    score_position: Literal["producer", "own"]
    aggregation: Literal["max", "mean"] = "max"
    calibration: Literal["none", "platt", "isotonic"]
    platt_a: FiniteFloat | None = None
    platt_b: FiniteFloat | None = None
    threshold: FiniteFloat = Field(gt=0.0, lt=1.0)
    # Per-token inputs beside the rows (hybrid probe), in the order their weights follow
    # the hidden weights. The engine computes them only when a loaded probe lists them.
    token_features: list[str] = Field(default_factory=list)
    # Claim verdict fusing the probe with the claim's token probability (detector.verdict):
    # when set, a claim's score and threshold are the verdict's; tokens keep the probe's.
    verdict: VerdictModel | None = None
    # Summary of the training rows (detector.drift): when set, the sidecar reports rows
    # and responses outside it; its tensors are drift_mean/drift_directions.
    drift: DriftSummary | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    library_version: str = __version__
    training: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if set(value) == {"."}:
            raise ValueError("name cannot be only dots (it names a directory)")
        return value

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, value: list[int]) -> list[int]:
        if value != sorted(set(value)):
            raise ValueError(f"layers must be sorted and unique, got {value}")
        return value

    @field_validator("token_features")
    @classmethod
    def _check_token_features(cls, value: list[str]) -> list[str]:
        unknown = [f for f in value if f not in TOKEN_FEATURES]
        if unknown:
            raise ValueError(
                f"unknown token feature(s) {unknown}; this library (version {__version__}) "
                f"computes {list(TOKEN_FEATURES)}"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"token_features must be unique, got {value}")
        return value

    @field_validator("training")
    @classmethod
    def _check_training(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"training must be plain JSON data: {exc}") from None
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ProbeMetadata:
        top = self.model.num_layers - 1
        outside = [k for k in self.layers if not 1 <= k <= top]
        if outside:
            raise ValueError(
                f"layers {outside} are outside 1..{top} (model {self.model.name!r} has "
                f"{self.model.num_layers} layers; layer k is hidden_states[k])"
            )
        if self.hidden_size != self.model.hidden_size:
            raise ValueError(
                f"hidden_size {self.hidden_size} differs from model.hidden_size "
                f"{self.model.hidden_size}"
            )
        has_platt = (self.platt_a is not None, self.platt_b is not None)
        if self.calibration == "platt" and not all(has_platt):
            raise ValueError("calibration 'platt' needs both platt_a and platt_b")
        if self.calibration != "platt" and any(has_platt):
            raise ValueError(f"platt_a/platt_b are set but calibration is {self.calibration!r}")
        return self

    @property
    def claim_threshold(self) -> float:
        """The threshold a claim's score is compared with at the shipped operating point:
        the verdict's when there is one (its scores are the verdict's), else ``threshold``."""
        return self.verdict.threshold_for() if self.verdict is not None else self.threshold

    @property
    def hidden_dim(self) -> int:
        """Length of the row part of the input: the probe's layers' rows concatenated."""
        return len(self.layers) * self.hidden_size

    @property
    def input_dim(self) -> int:
        """Length of the probe's input: its layers' rows, then its token features."""
        return self.hidden_dim + len(self.token_features)


@dataclass(frozen=True, eq=False)
class ProbeArtifact:
    """A validated probe: metadata plus float32 tensors (checked on construction)."""

    metadata: ProbeMetadata
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    isotonic_x: torch.Tensor | None = None
    isotonic_y: torch.Tensor | None = None
    drift_mean: torch.Tensor | None = None
    drift_directions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        where = f"probe {self.metadata.name!r}"
        _check_tensors(self.metadata, self.tensors(), where)
        _check_scoring_numbers(self, where)

    @property
    def name(self) -> str:
        return self.metadata.name

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored in ``probe.safetensors`` (absent optional ones omitted)."""
        names = REQUIRED_TENSORS + OPTIONAL_TENSORS
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the artifact directory atomically: readers see the old probe or the new one.

        Both files are written into a temporary sibling directory that is renamed into
        place, so a crash never leaves a half-written probe (or a json/tensors pair from
        two different versions) for the sidecar to load.
        """
        directory = Path(directory)
        if directory.exists():
            if not overwrite:
                raise ProbeArtifactError(f"{directory}: already exists (pass overwrite=True)")
            if not directory.is_dir():
                raise ProbeArtifactError(f"{directory}: exists and is not a directory")
            foreign = sorted(
                p.name for p in directory.iterdir() if p.name not in (METADATA_FILE, TENSORS_FILE)
            )
            if foreign:
                raise ProbeArtifactError(
                    f"{directory}: refusing to replace a directory that holds other files {foreign}"
                )
        # What loading refuses is never written.
        meta = self.metadata.model_dump_json(indent=2).encode() + b"\n"
        where = f"probe {self.name!r}: {METADATA_FILE}"
        if len(meta) > MAX_METADATA_BYTES:
            raise ProbeArtifactError(f"{where} would be {len(meta)} bytes, more than the "
                                     f"{MAX_METADATA_BYTES}-byte limit (training holds too much)")
        check_json_shape(meta, where)
        parent = directory.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
            _write_synced(tmp / TENSORS_FILE, _st_save(tensors, metadata={"format": "pt"}))
            _write_synced(tmp / METADATA_FILE, meta)
            _fsync_dir(tmp)
            if directory.exists():
                # No atomic directory swap in the stdlib: readers may briefly see no probe
                # (a clean "missing" error), never a mixed one.
                old = parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(directory, old)
                os.rename(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, directory)
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved probe %r to %s", self.name, directory)
        return directory


def load_probe(path: str | Path) -> ProbeArtifact:
    """Load and fully validate a probe artifact directory (or its probe.json/probe.safetensors).

    Only ``probe.json`` and ``probe.safetensors`` are ever opened; any other file (a
    ``probe.pkl`` from an older tool, say) is ignored and never deserialised.
    """
    path = Path(path)
    if path.is_file():
        if path.name not in (METADATA_FILE, TENSORS_FILE):
            raise ProbeArtifactError(
                f"{path}: not a probe artifact; a probe is a directory holding "
                f"{TENSORS_FILE} + {METADATA_FILE} (pickle and other formats are never read)"
            )
        path = path.parent
    if not path.is_dir():
        raise ProbeArtifactError(f"{path}: no such probe artifact directory")
    for other in sorted(path.iterdir()):
        if other.name in (METADATA_FILE, TENSORS_FILE):
            continue
        if other.suffix.lower() in _PICKLE_SUFFIXES:
            logger.warning("%s: ignored; pickle-style files are never loaded", other)
        else:
            logger.debug("%s: ignored (not part of the probe format)", other)

    meta_path, tensors_path = path / METADATA_FILE, path / TENSORS_FILE
    metadata = _read_metadata(meta_path)
    tensors = _read_tensors(tensors_path)
    _check_tensors(metadata, tensors, str(tensors_path))
    artifact = ProbeArtifact(metadata=metadata, **tensors)
    logger.info(
        "loaded probe %r (layers %s, %s calibration) from %s",
        metadata.name, metadata.layers, metadata.calibration, path,
    )  # fmt: skip
    return artifact


def probe_dir_within(path: str | Path, roots: Sequence[str | Path]) -> Path:
    """The probe directory ``path`` names, fully resolved, if it and both files read from it
    lie under one of ``roots``; :class:`ProbePathError` otherwise.

    For loads a remote caller names (``LoadProbe``): symlinks and ``..`` are resolved
    before the check, for the directory and for each file, so neither a link nor a path
    that climbs out reads outside the roots. Load from the returned path.
    """
    shown = str(path)[:300]
    try:
        resolved = Path(path).resolve()
        if resolved.name in (METADATA_FILE, TENSORS_FILE) and resolved.is_file():
            resolved = resolved.parent
        targets = [resolved, *((resolved / f).resolve() for f in (METADATA_FILE, TENSORS_FILE))]
        allowed = [Path(r).resolve() for r in roots]
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops, ...
        raise ProbeArtifactError(f"{shown}: not a usable path: {exc}") from None
    for target in targets:
        if not any(target == root or root in target.parents for root in allowed):
            inside = ", ".join(str(r) for r in allowed) or "none configured"
            raise ProbePathError(
                f"{shown}: {'resolves to ' + str(target) + ', ' if str(target) != shown else ''}"
                f"outside the folders probes may be loaded from ({inside}); set "
                "LIE_DETECTOR_PROBE_ROOTS (default: the folders holding the probes the sidecar "
                "started with)")
    return resolved


DEFAULT_PROBE_NAME = "smollm2-135m-fabrication"
# The shipped probes: package data of ``detector`` (pyproject's package-data), written by
# ``lie-detector train-default``; a sidecar-only install has them without ``probes``.
SHIPPED_PROBES_DIR = Path(__file__).resolve().parent / "default_probe"


def default_probe_dir() -> Path | None:
    """The probe shipped for the embedded model (``lie-detector train-default``), if present."""
    path = SHIPPED_PROBES_DIR / DEFAULT_PROBE_NAME
    return path if (path / METADATA_FILE).is_file() else None


def check_compatible(
    meta: ProbeMetadata, served: ModelIdentity, captured_layers: Sequence[int]
) -> None:
    """Refuse a probe whose model or layers differ from what is served and captured.

    A probe applied to another model's residual stream produces confident nonsense, so
    every mismatch of the model is an error, reported together; layers are only suggested
    for the probe's own model, and only layers that model has.
    """
    problems: list[str] = []
    trained = meta.model
    if trained.fingerprint != served.fingerprint:
        problems.append(
            f"it was trained on model {trained.name!r} (fingerprint {trained.fingerprint}) "
            f"but the served model {served.name!r} has fingerprint {served.fingerprint}"
        )
    if meta.hidden_size != served.hidden_size:
        problems.append(
            f"its hidden size is {meta.hidden_size} but the served model's is {served.hidden_size}"
        )
    if trained.num_layers != served.num_layers:
        problems.append(
            f"it was trained on a {trained.num_layers}-layer model but the served model "
            f"has {served.num_layers} layers"
        )
    if problems:
        # Another model's probe: no choice of layers helps, so none is suggested.
        raise ProbeMismatchError(
            f"probe {meta.name!r} cannot be used: " + "; ".join(problems)
            + f"; train a probe for {served.name} (docs/your-model.md)")
    captured = sorted(set(int(k) for k in captured_layers))
    missing = [k for k in meta.layers if k not in captured]
    if missing:
        # The model is the probe's own, so every layer the probe reads exists in it.
        wanted = ",".join(str(k) for k in sorted(set(captured) | set(meta.layers))
                          if 1 <= k < served.num_layers)
        raise ProbeMismatchError(
            f"probe {meta.name!r} cannot be used: it reads layers {meta.layers} but "
            f"layer(s) {missing} are not captured (captured: {captured}); capture them by "
            f"starting vLLM with {LAYERS_ENV}={wanted}")


def probe_token_features(metas: Sequence[ProbeMetadata]) -> list[str]:
    """Every token feature any of the probes reads, as a linear input or through its
    verdict, in canonical order (what the engine must compute:
    ``LIE_DETECTOR_TOKEN_FEATURES``)."""
    wanted = {f for m in metas for f in m.token_features}
    wanted |= {f for m in metas if m.verdict is not None for f in m.verdict.token_features}
    return [f for f in TOKEN_FEATURES if f in wanted]


def linear_token_features(metas: Sequence[ProbeMetadata]) -> list[str]:
    """The token features the probes' weights read (hybrid probes), in canonical order."""
    wanted = {f for m in metas for f in m.token_features}
    return [f for f in TOKEN_FEATURES if f in wanted]


def folded_linear(art: ProbeArtifact) -> tuple[torch.Tensor, float]:
    """Fold standardisation into the weights so scoring is a single dot product.

    ``((x - mean) / scale) . w + b == x . (w / scale) + (b - sum(w * mean / scale))``.
    Computed in float64 and rounded once, to keep the folded logit close to the
    unfolded one. For a hybrid probe the last ``len(token_features)`` entries of the
    returned weight apply to the token features, folded like the rest.
    """
    w = art.weight.double()
    b = float(art.bias.double()[0])
    if art.scale is not None:
        w = w / art.scale.double()
    if art.mean is not None:
        b -= float((w * art.mean.double()).sum())
    return w.float().contiguous(), b


# ----------------------------------------------------------------------------- internals

# Largest |logit| a probe may produce from rows of this magnitude without overflowing: the
# folded weights' L1 norm times it must stay finite in float32, so the fused matmul can
# never give inf - inf = NaN. Real residual rows stay far below 1e4.
_ROW_BOUND = 1e4
_F32_MAX = float(torch.finfo(torch.float32).max)


def _check_scoring_numbers(art: ProbeArtifact, where: str) -> None:
    """What the scorer computes from the probe must be finite in float32, its scoring dtype:
    the folded weights and bias, the Platt parameters, and a logit from any row of
    plausible magnitude. Finite float64 values (a scale of 1e308) are not enough."""
    meta = art.metadata
    try:
        w, b = folded_linear(art)
    except (OverflowError, ZeroDivisionError) as exc:
        raise ProbeArtifactError(f"{where}: folding standardisation into the weights "
                                 f"fails: {exc}") from None
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise ProbeArtifactError(f"{where}: {bad} weight(s) are not finite in float32 once "
                                 "standardisation is folded in (weight/scale overflows)")
    if not math.isfinite(b) or abs(b) > _F32_MAX:
        raise ProbeArtifactError(f"{where}: the bias is not finite in float32 once "
                                 f"standardisation is folded in ({b!r})")
    reach = float(w.double().abs().sum()) * _ROW_BOUND + abs(b)
    if not reach < _F32_MAX:
        raise ProbeArtifactError(f"{where}: weights too large: a row of magnitude "
                                 f"{_ROW_BOUND:g} could give an infinite logit")
    if meta.calibration == "platt":
        for name in ("platt_a", "platt_b"):
            value = float(getattr(meta, name))
            if not abs(value) < _F32_MAX:
                raise ProbeArtifactError(f"{where}: {name} {value!r} is not finite in float32")
        if not abs(float(meta.platt_a)) * reach + abs(float(meta.platt_b)) < _F32_MAX:
            raise ProbeArtifactError(f"{where}: platt_a {meta.platt_a!r} times the probe's "
                                     "largest logit overflows float32")



def _check_drift(meta: ProbeMetadata, tensors: dict[str, Any], where: str) -> None:
    """The drift summary's tensors exist exactly when probe.json has ``drift``, and fit it."""
    present = [n for n in DRIFT_TENSORS if tensors.get(n) is not None]
    if meta.drift is None:
        if present:
            raise ProbeArtifactError(f"{where}: tensor(s) {present} present but probe.json "
                                     "has no drift summary")
        return
    if len(present) != len(DRIFT_TENSORS):
        missing = [n for n in DRIFT_TENSORS if n not in present]
        raise ProbeArtifactError(f"{where}: drift summary needs tensor(s) {missing}")
    why = check_drift_tensors(meta.drift, tensors["drift_mean"].numpy(),
                              tensors["drift_directions"].numpy(), meta.hidden_dim, _ROW_BOUND)
    if why is not None:
        raise ProbeArtifactError(f"{where}: {why}")


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read_limited(path: Path, limit: int) -> bytes:
    if not path.is_file():
        raise ProbeArtifactError(
            f"{path}: missing (a probe needs {METADATA_FILE} + {TENSORS_FILE})"
        )
    size = path.stat().st_size
    if size > limit:
        raise ProbeArtifactError(f"{path}: {size} bytes is larger than the {limit}-byte limit")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProbeArtifactError(f"{path}: cannot be read: {exc}") from None


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"]) or "(file)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _check_raw_metadata(raw: bytes, path: Path) -> None:
    """Checks the typed schema cannot make: Literal[1] accepts ``true`` and ``1.0``, and
    ModelIdentity ignores unknown keys, which a tampered file must not rely on."""
    doc = _parse_bounded_json(raw, path, "JSON")
    if not isinstance(doc, dict):
        raise ProbeArtifactError(f"{path}: must hold a JSON object, got {type(doc).__name__}")
    if "format_version" not in doc:
        raise ProbeArtifactError(f"{path}: format_version is missing")
    version = doc["format_version"]
    if type(version) is not int:
        raise ProbeArtifactError(
            f"{path}: format_version must be the integer {FORMAT_VERSION}, got {version!r}"
        )
    if version != FORMAT_VERSION:
        raise ProbeArtifactError(
            f"{path}: format_version {version} is not supported; this library "
            f"(version {__version__}) reads format_version {FORMAT_VERSION}"
        )
    model = doc.get("model")
    if isinstance(model, dict):
        extra = sorted(set(model) - set(ModelIdentity.model_fields))
        if extra:
            raise ProbeArtifactError(
                f"{path}: invalid probe metadata: model has unexpected field(s) {extra}"
            )


# The bytes that open or close a container or a string, or escape the next byte.
_JSON_MARKS = re.compile(rb'[\\"\[\]{}]')


def check_json_shape(raw: bytes, where: str, what: str = "JSON") -> None:
    """Refuse JSON too large or too deeply nested to be a probe's, from its bytes alone.

    Counts come from ``bytes.count`` (C speed, any size); nesting from a walk over the
    container and string marks only, run once the counts bound how many there are.
    """
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise ProbeArtifactError(
            f"{where}: {what} holds {containers} arrays and objects, more than the "
            f"{MAX_JSON_CONTAINERS} a probe could need (too large or nested too deeply)")
    tokens = sum(raw.count(c) for c in (b'"', b"\\", b",", b":"))
    if tokens > MAX_JSON_TOKENS:
        raise ProbeArtifactError(
            f"{where}: {what} holds about {tokens} strings and items, more than the "
            f"{MAX_JSON_TOKENS} a probe could need")
    depth, in_string, escaped = 0, False, -1
    for mark in _JSON_MARKS.finditer(raw):
        at = mark.start()
        byte = raw[at]
        if at == escaped:
            continue
        if in_string:
            if byte == 0x5C:  # backslash: the next byte is literal
                escaped = at + 1
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ProbeArtifactError(f"{where}: {what} nested too deeply (more than "
                                         f"{MAX_JSON_DEPTH} levels)")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def _parse_bounded_json(raw: bytes, where: Path, what: str) -> Any:
    """``json.loads`` of bytes that passed :func:`check_json_shape`; a reason otherwise."""
    check_json_shape(raw, str(where), what)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProbeArtifactError(f"{where}: not valid {what}: {exc}") from None


def _read_metadata(path: Path) -> ProbeMetadata:
    raw = _read_limited(path, MAX_METADATA_BYTES)
    _check_raw_metadata(raw, path)
    try:
        # strict: a tampered "hidden_size": "4096" is an error, not silently coerced.
        return ProbeMetadata.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise ProbeArtifactError(f"{path}: invalid probe metadata: {_describe(exc)}") from None


def _check_safetensors_layout(data: bytes, path: Path) -> None:
    """Check the header against the file before the library parses it, for clear reasons."""
    if len(data) < 8:
        raise ProbeArtifactError(f"{path}: truncated ({len(data)} bytes; no safetensors header)")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise ProbeArtifactError(
            f"{path}: truncated or corrupt (header claims {n} bytes, file has {len(data) - 8})"
        )
    if n > MAX_HEADER_BYTES:
        raise ProbeArtifactError(f"{path}: safetensors header of {n} bytes is larger than the "
                                 f"{MAX_HEADER_BYTES}-byte limit (a probe's is under 1 KiB)")
    header = _parse_bounded_json(data[8 : 8 + n], path, "safetensors header")
    if not isinstance(header, dict):
        raise ProbeArtifactError(f"{path}: corrupt safetensors header (not a JSON object)")
    buffer = len(data) - 8 - n
    end_max = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
        except (KeyError, TypeError, ValueError):
            raise ProbeArtifactError(f"{path}: corrupt header entry for tensor {key!r}") from None
        if not isinstance(dtype, str):
            raise ProbeArtifactError(f"{path}: corrupt dtype for tensor {key!r}")
        itemsize = _ST_ITEMSIZE.get(dtype)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise ProbeArtifactError(f"{path}: corrupt data offsets for tensor {key!r}")
        if end > buffer:
            raise ProbeArtifactError(
                f"{path}: truncated (tensor {key!r} ends at byte {end} of a {buffer}-byte body)"
            )
        if itemsize is not None and numel * itemsize != end - begin:
            raise ProbeArtifactError(f"{path}: tensor {key!r} size does not match its shape")
        end_max = max(end_max, end)
    if end_max != buffer:
        raise ProbeArtifactError(f"{path}: corrupt ({buffer - end_max} unexplained trailing bytes)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    data = _read_limited(path, MAX_TENSORS_BYTES)
    _check_safetensors_layout(data, path)
    try:
        tensors = _st_load(data)
    except Exception as exc:  # the library's own refusal, whatever its type
        raise ProbeArtifactError(f"{path}: not a valid safetensors file: {exc}") from None
    unknown = sorted(set(tensors) - set(REQUIRED_TENSORS) - set(OPTIONAL_TENSORS))
    if unknown:
        raise ProbeArtifactError(f"{path}: unexpected tensor(s) {unknown}")
    missing = [k for k in REQUIRED_TENSORS if k not in tensors]
    if missing:
        raise ProbeArtifactError(f"{path}: missing tensor(s) {missing}")
    return tensors


def _check_tensors(meta: ProbeMetadata, tensors: dict[str, Any], where: str) -> None:
    """Names, dtypes, shapes and values of a probe's tensors, against its metadata."""
    d = meta.input_dim
    shapes: dict[str, tuple[int, ...]] = {"weight": (d,), "bias": (1,), "mean": (d,), "scale": (d,)}
    iso = meta.calibration == "isotonic"
    for name in ("isotonic_x", "isotonic_y"):
        if iso and tensors.get(name) is None:
            raise ProbeArtifactError(f"{where}: calibration 'isotonic' needs tensor {name!r}")
        if not iso and tensors.get(name) is not None:
            raise ProbeArtifactError(
                f"{where}: tensor {name!r} present but calibration is {meta.calibration!r}"
            )
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ProbeArtifactError(f"{where}: {name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype != torch.float32:
            raise ProbeArtifactError(f"{where}: tensor {name!r} is {t.dtype}, expected float32")
        expected = shapes.get(name)
        if expected is not None and tuple(t.shape) != expected:
            why = "" if name == "bias" else (
                f" ({len(meta.layers)} layers x hidden size {meta.hidden_size}"
                + (f" + token features {meta.token_features}" if meta.token_features else "")
                + ")"
            )
            raise ProbeArtifactError(
                f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {expected}{why}"
            )
        if expected is None and t.dim() != 1 and name != "drift_directions":
            raise ProbeArtifactError(f"{where}: tensor {name!r} must be 1-D, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ProbeArtifactError(f"{where}: tensor {name!r} has {bad} NaN/Inf value(s)")
    _check_drift(meta, tensors, where)
    scale = tensors.get("scale")
    if scale is not None and not bool((scale > 0).all()):
        bad = int((scale <= 0).sum())
        raise ProbeArtifactError(f"{where}: tensor 'scale' has {bad} value(s) <= 0")
    if iso:
        x, y = tensors["isotonic_x"], tensors["isotonic_y"]
        if x.shape != y.shape or x.numel() == 0:
            raise ProbeArtifactError(
                f"{where}: isotonic_x {tuple(x.shape)} and isotonic_y {tuple(y.shape)} must be "
                "non-empty and the same length"
            )
        if not bool((x[1:] > x[:-1]).all()):
            raise ProbeArtifactError(f"{where}: isotonic_x must be strictly increasing")
        if not bool((y[1:] >= y[:-1]).all()):
            raise ProbeArtifactError(f"{where}: isotonic_y must be non-decreasing (isotonic)")
        if not bool(((y >= 0) & (y <= 1)).all()):
            raise ProbeArtifactError(f"{where}: isotonic_y must be probabilities in [0, 1]")


__all__ = [
    "FORMAT_VERSION",
    "LAYERS_ENV",
    "METADATA_FILE",
    "TOKEN_FEATURES_ENV",
    "TENSORS_FILE",
    "ProbeArtifact",
    "ProbeArtifactError",
    "ProbeMetadata",
    "ProbeMismatchError",
    "ProbePathError",
    "check_compatible",
    "check_json_shape",
    "folded_linear",
    "linear_token_features",
    "load_probe",
    "probe_dir_within",
    "probe_token_features",
]
