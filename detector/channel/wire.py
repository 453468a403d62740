"""The channel's wire format: one message per engine step, decoded defensively.

A message is a ZeroMQ multipart message of two frames:

1. a JSON header (``StepHeader``, ``Heartbeat`` or ``CaptureStatus``, told apart by
   ``kind``);
2. for a step, the rows: one contiguous C-order buffer of shape
   ``(len(layers), num_rows, hidden_size)`` in ``dtype``; empty otherwise.

Rows of request ``r`` are ``rows[:, r.row_offset : r.row_offset + r.num_rows]`` and row ``j``
of that slice is the residual stream at position ``r.first_position + j`` after reading
token ``r.input_token_ids[j]``. Everything the sidecar needs to attribute a row is in the
same message, so a dropped message can lose rows but never shift them onto another request.

A step names its engine by ``engine_id`` (one engine epoch: the id changes when vLLM
restarts). The full ``EngineInfo`` (layers, hidden size, dtype, limits) rides only on the
steps the sidecar may not have it for: the first of an epoch, the first after a sidecar
(re)connects or after a send that carried it failed, and then one at least every second
(``ENGINE_INFO_EVERY_S``); heartbeats always carry it. The sidecar keeps the info of the
last few engines (``EngineInfoCache``) and reads the other steps against it; a step of an
engine it has no info for is refused (``UnknownEngine``, counted apart) and one whose info
differs from what that engine sent before is refused as forged (``EngineInfoMismatch``).
See ``docs/design/channel.md``.

A step is checked request by request: one request's share that does not validate (an id
too long, a token outside the vocabulary) is refused alone (``StepHeader.refused``) and its
step-mates' rows are kept, as long as where its rows lie (``row_offset``, ``num_rows``) can
be read. The hook sends ids in bounded form (``detector.channel.ids``), so an id a client
chose never gets a request refused.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Annotated, Any, Final, Literal

import numpy as np
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from detector.channel.ids import MAX_ID_CHARS

# 2: a step names its engine (``engine_id``) and carries its ``EngineInfo`` only now and then.
# Version 1 messages (every step carries its engine) are still read: a sidecar can be
# upgraded before the engines that talk to it.
WIRE_VERSION: Final = 2
READ_VERSIONS = (1, 2)
# How often, at least, a step carries its engine's full info while steps flow: the longest a
# sidecar that (re)starts mid-run waits before it can read the engine's steps.
ENGINE_INFO_EVERY_S = 1.0
# Engines whose info a sidecar keeps (one channel normally has one engine; a restart adds
# one, and steps of the previous epoch may still be in flight).
MAX_ENGINES_REMEMBERED = 8
MAX_ENGINE_ID_CHARS = 128
MAX_FINGERPRINT_CHARS = 256
MAX_ROWS_PER_STEP = 1 << 20
MAX_POSITION = 1 << 24  # far beyond any context length; bounds what a header can make us allocate
MAX_TOKEN_ID = 1 << 31  # past any vocabulary; a token id is an int32 everywhere downstream
MAX_LAYERS = 256
MAX_HIDDEN = 65536
# Bounds on a request's stop strings (vLLM sets none; a request beyond them is sent without
# its stop rule, see detector.engine.vllm_adapter).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 256
# Bounds on a capture status: its reason is shown in one line (logs, ListProbes, the CLI).
MAX_REASON_CHARS = 1000
MAX_MODEL_CHARS = 4096
# An engine id: printable ASCII without spaces (vLLM's is a uuid4 hex), so it can be logged.
EngineId = Annotated[str, Field(min_length=1, max_length=MAX_ENGINE_ID_CHARS,
                                pattern=r"^[!-~]+$")]

# Wire dtype name -> (torch dtype, bytes per element). bfloat16 has no numpy dtype, so rows
# travel as raw bytes and are rebuilt with torch.
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "float32": (torch.float32, 4),
    "float16": (torch.float16, 2),
    "bfloat16": (torch.bfloat16, 2),
}
TORCH_TO_WIRE = {v[0]: k for k, v in DTYPES.items()}


class WireError(ValueError):
    """A message that cannot be trusted; it is dropped whole and counted."""


class UnknownEngine(WireError):
    """A step that refers to an engine whose info this sidecar has not got (it started or
    restarted mid-run, or the step that carried the info was lost). Dropped and counted
    apart from malformed messages: the info comes again within ``ENGINE_INFO_EVERY_S``."""


class EngineInfoMismatch(WireError):
    """A message whose engine info differs from what the same engine id sent before: an
    engine's info never changes within its epoch, so this one is broken or forged."""


class EngineInfo(BaseModel):
    """Identifies one running vLLM engine; ``engine_id`` changes when vLLM restarts."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    engine_id: EngineId
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)]
    model_path: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    fingerprint: Annotated[str, Field(max_length=MAX_FINGERPRINT_CHARS)] | None = None
    hidden_size: Annotated[int, Field(gt=0, le=MAX_HIDDEN)]
    num_layers: Annotated[int, Field(gt=0, le=MAX_LAYERS * 4)]
    layers: list[int]
    dtype: Literal["float32", "float16", "bfloat16"]
    capture_method: Literal["aux_hidden_states", "forward_hook"]
    pid: Annotated[int, Field(ge=0, le=1 << 31)]
    started_at: float
    # Per-token features the hook computes for sampled tokens (LIE_DETECTOR_TOKEN_FEATURES,
    # detector.engine.token_features); empty from older hooks.
    token_features: Annotated[list[Literal["logprob", "entropy"]],
                              Field(max_length=8)] = Field(default_factory=list)
    # The engine's limits, which bound every message it sends (None from older hooks: the
    # format's own bounds apply).
    vocab_size: Annotated[int, Field(gt=0, le=MAX_TOKEN_ID)] | None = None
    max_model_len: Annotated[int, Field(gt=0, le=MAX_POSITION)] | None = None

    @model_validator(mode="after")
    def _layers_valid(self) -> EngineInfo:
        if not self.layers or len(self.layers) > MAX_LAYERS:
            raise ValueError("layers must be a non-empty list")
        if sorted(set(self.layers)) != self.layers:
            raise ValueError("layers must be sorted and unique")
        if self.layers[0] < 1 or self.layers[-1] >= self.num_layers:
            raise ValueError(f"layers must lie in 1..{self.num_layers - 1}")
        return self


class StopRule(BaseModel):
    """A request's stop strings, as vLLM's detokenizer applies them in the API process.

    The engine runs past a matched stop string (the API process aborts it a step or more
    later), so the sidecar needs them to keep to the text the client received."""

    model_config = ConfigDict(frozen=True)

    strings: Annotated[
        tuple[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)], ...],
        Field(min_length=1, max_length=MAX_STOP_STRINGS),
    ]
    include_in_output: bool = False
    # vLLM checks stop strings only once this many tokens are out.
    min_tokens: Annotated[int, Field(ge=0, le=MAX_POSITION)] = 0


class RequestRows(BaseModel):
    """One request's share of a step."""

    model_config = ConfigDict(frozen=True)

    req_id: str = Field(max_length=MAX_ID_CHARS)
    row_offset: Annotated[int, Field(ge=0)]
    num_rows: Annotated[int, Field(ge=0)]
    first_position: Annotated[int, Field(ge=0, le=MAX_POSITION)]
    num_prompt_tokens: Annotated[int, Field(ge=0, le=MAX_POSITION)]
    input_token_ids: list[int]
    # Tokens sampled in this step (empty for a partial prefill chunk).
    sampled_token_ids: list[int] = Field(default_factory=list)
    # Sent once, with the request's first step (None: no stop strings, or an older hook).
    stop: StopRule | None = None
    # Token features of the sampled tokens, one value per sampled token, when the engine
    # computes them (a hybrid probe is loaded); None: not computed, or an older hook.
    sampled_logprobs: list[FiniteFloat] | None = None
    sampled_entropies: list[FiniteFloat] | None = None

    @model_validator(mode="after")
    def _tokens_match_rows(self) -> RequestRows:
        if len(self.input_token_ids) != self.num_rows:
            raise ValueError("input_token_ids must have one id per row")
        for name in ("sampled_logprobs", "sampled_entropies"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.sampled_token_ids):
                raise ValueError(f"{name} must have one value per sampled token")
        return self


class RefusedRows(BaseModel):
    """A request's share of a step that did not validate: its rows are skipped, its
    step-mates' kept. Made by :func:`decode`, never sent."""

    model_config = ConfigDict(frozen=True)

    # Its id when that could be read (at most MAX_ID_CHARS), else None.
    req_id: str | None
    row_offset: Annotated[int, Field(ge=0)]
    num_rows: Annotated[int, Field(ge=0)]
    reason: str


class _RowSpan(BaseModel):
    """The least a request's share must say for its rows to be told from its step-mates'."""

    row_offset: Annotated[int, Field(ge=0)]
    num_rows: Annotated[int, Field(ge=0)]
    req_id: Any = None


class StepHeader(BaseModel):
    """One engine step: every request that ran in it, and the requests that ended.

    ``engine`` is the full engine info when this step carries it (see the module's
    docstring), else None on the wire; :func:`decode` fills it from the sidecar's
    ``EngineInfoCache``, so a decoded step always has it."""

    kind: Literal["step"] = "step"
    version: Literal[1, 2] = WIRE_VERSION
    # "" (the default, never sent): a step built with its engine, or a version 1 step, need
    # not repeat its id; the validator takes the engine's. (A "before" validator would do
    # it too, but would make pydantic build the whole JSON as Python objects first: about
    # 1.7 µs more per request.)
    engine_id: EngineId = ""
    engine: EngineInfo | None = None
    seq: Annotated[int, Field(ge=0)]
    time_ns: int
    num_rows: Annotated[int, Field(ge=0, le=MAX_ROWS_PER_STEP)]
    requests: list[RequestRows]
    finished: list[str] = Field(default_factory=list)
    # Time the hook spent inside the engine thread for this step.
    hook_ns: int = 0
    dropped_total: Annotated[int, Field(ge=0)] = 0
    # Steps waiting in the hook's queue when this one was sent.
    queue_depth: Annotated[int, Field(ge=0)] = 0

    # Requests whose share did not validate (see RefusedRows); set by decode, never sent.
    refused: list[RefusedRows] = Field(default_factory=list, exclude=True)

    @model_validator(mode="after")
    def _rows_partition(self, info: ValidationInfo) -> StepHeader:
        if not self.engine_id:
            if self.engine is None:
                raise ValueError("a step must name its engine (engine_id)")
            self.engine_id = self.engine.engine_id
        if self.engine is not None and self.engine.engine_id != self.engine_id:
            raise ValueError(f"engine_id {self.engine_id!r} is not its engine's "
                             f"({self.engine.engine_id!r})")
        if self.engine is None and self.version == 1:
            raise ValueError("a version 1 step must carry its engine")
        refused: list[RefusedRows] = list((info.context or {}).get("refused", ()))
        end = 0
        shares = sorted([*self.requests, *refused], key=lambda r: r.row_offset) if refused \
            else self.requests
        for r in shares:
            if r.row_offset != end:
                raise ValueError("request rows must be consecutive and start at 0")
            end += r.num_rows
        if end != self.num_rows:
            raise ValueError(f"requests cover {end} rows, header says {self.num_rows}")
        self.refused = refused
        if self.engine is not None:
            self.refuse_beyond(self.engine)
        return self

    def refuse_beyond(self, engine: EngineInfo) -> None:
        """Refuse the shares this engine cannot have sent (tokens outside its vocabulary,
        positions past its context length), keeping their step-mates'."""
        kept = []
        for r in self.requests:
            problem = _beyond_engine(engine, r)
            if problem:
                self.refused.append(RefusedRows(req_id=r.req_id, row_offset=r.row_offset,
                                                num_rows=r.num_rows, reason=problem))
            else:
                kept.append(r)
        self.requests = kept


def _beyond_engine(engine: EngineInfo, r: RequestRows) -> str:
    """What of ``r`` ``engine`` cannot have sent ("" when nothing)."""
    vocab = engine.vocab_size or MAX_TOKEN_ID
    length = engine.max_model_len or MAX_POSITION
    for name in ("input_token_ids", "sampled_token_ids"):
        ids = getattr(r, name)
        if ids and not (0 <= min(ids) and max(ids) < vocab):
            return f"{name} outside the vocabulary (0..{vocab - 1})"
    if r.num_prompt_tokens > length or \
            r.first_position + r.num_rows + len(r.sampled_token_ids) > length + 1:
        return f"positions beyond the engine's context length {length}"
    return ""


class EngineInfoCache:
    """The info of the last few engines heard from, by engine id: what a step that refers
    to its engine by id is read against.

    Bounded (``MAX_ENGINES_REMEMBERED``, the least recently used forgotten first). An
    engine's info never changes within its epoch: the first info accepted for an id stays,
    and a message that says otherwise is refused (``EngineInfoMismatch``). Only the receive
    thread that decodes uses it (no lock)."""

    def __init__(self, size: int = MAX_ENGINES_REMEMBERED) -> None:
        if size < 1:
            raise ValueError("an engine info cache holds at least one engine")
        self.size = size
        self._infos: OrderedDict[str, EngineInfo] = OrderedDict()

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, engine_id: object) -> bool:
        return engine_id in self._infos

    def get(self, engine_id: str) -> EngineInfo | None:
        info = self._infos.get(engine_id)
        if info is not None:
            self._infos.move_to_end(engine_id)
        return info

    def check(self, engine: EngineInfo) -> EngineInfo:
        """The info to use for a message that carries ``engine``: the stored one (the same
        object every time) when it is equal; raise ``EngineInfoMismatch`` when it differs."""
        known = self._infos.get(engine.engine_id)
        if known is None or known is engine:
            return engine
        if known != engine:
            raise EngineInfoMismatch(
                f"engine {engine.engine_id[:16]} sent info that differs from what it sent "
                f"before ({_differences(known, engine)}); an engine's info never changes, "
                f"so the message is refused")
        return known

    def remember(self, engine: EngineInfo) -> None:
        """Keep ``engine``'s info (after :meth:`check`), forgetting the oldest beyond size."""
        if engine.engine_id in self._infos:
            self._infos.move_to_end(engine.engine_id)
            return
        self._infos[engine.engine_id] = engine
        while len(self._infos) > self.size:
            self._infos.popitem(last=False)


def _differences(known: EngineInfo, said: EngineInfo) -> str:
    names = [n for n in EngineInfo.model_fields if getattr(known, n) != getattr(said, n)]
    return "fields " + ", ".join(names)


class Heartbeat(BaseModel):
    """Sent when the engine is idle, so the sidecar knows the hook is alive. Always carries
    the engine's full info: an idle engine's sidecar learns it within a heartbeat."""

    kind: Literal["heartbeat"] = "heartbeat"
    version: Literal[1, 2] = WIRE_VERSION
    engine: EngineInfo
    time_ns: int
    steps_published: Annotated[int, Field(ge=0)] = 0
    dropped_total: Annotated[int, Field(ge=0)] = 0
    queue_depth: Annotated[int, Field(ge=0)] = 0
    # The seq the next step will carry: lets the sidecar see a gap without waiting.
    next_seq: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _drops_have_seqs(self) -> Heartbeat:
        # Every dropped step had taken a seq below the next one.
        if self.dropped_total > self.next_seq:
            raise ValueError(f"dropped_total {self.dropped_total} exceeds the steps so far "
                             f"({self.next_seq})")
        return self


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` as one printable line of at most ``limit`` characters: what a capture
    status may carry (an exception's text can hold newlines or terminal escapes)."""
    cleaned = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def _printable(value: str | None, name: str) -> None:
    if value is not None and not value.isprintable():
        raise ValueError(f"{name} must be one printable line")


class CaptureStatus(BaseModel):
    """Whether the plugin captures in this engine, and if not, why.

    An engine whose plugin switched capture off (layers outside the model, an unsupported
    dtype or runner, capture failing mid-run, ...) sends this in place of heartbeats, so the
    sidecar and ``lie-detector capture`` can say why within a heartbeat instead of waiting
    for a hook that never speaks. An engine that captures says so in its heartbeats'
    and steps' ``EngineInfo`` (or ``engine_id``); ``enabled=True`` here is for completeness. The engine fields are what
    could be read (an engine may switch off before its config is known)."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    kind: Literal["capture_status"] = "capture_status"
    version: Literal[1, 2] = WIRE_VERSION
    enabled: bool
    reason: Annotated[str, Field(max_length=MAX_REASON_CHARS)] = ""
    capture_method: Literal["aux_hidden_states", "forward_hook"] | None = None
    layers: Annotated[list[Annotated[int, Field(ge=1, le=MAX_LAYERS * 4)]],
                      Field(max_length=MAX_LAYERS)] = Field(default_factory=list)
    engine_id: Annotated[str, Field(max_length=128)] = ""
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] = ""
    model_path: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    pid: Annotated[int, Field(ge=0, le=1 << 31)] = 0
    num_layers: Annotated[int, Field(gt=0, le=MAX_LAYERS * 4)] | None = None
    hidden_size: Annotated[int, Field(gt=0, le=MAX_HIDDEN)] | None = None
    time_ns: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _consistent(self) -> CaptureStatus:
        for name in ("reason", "engine_id", "model", "model_path"):
            _printable(getattr(self, name), name)
        if self.enabled and (self.capture_method is None or not self.layers):
            raise ValueError("a capture that is on must say its method and layers")
        if not self.enabled and not self.reason.strip():
            raise ValueError("a capture that is off must say why (reason)")
        return self

    def summary(self) -> str:
        """One line for people: ``capture is OFF in vLLM (pid N): <reason>``."""
        where = f"vLLM (pid {self.pid})" if self.pid else "vLLM"
        if self.enabled:
            return (f"capture is ON in {where}: layers {self.layers} via "
                    f"{self.capture_method}")
        return f"capture is OFF in {where}: {self.reason}"


def encode_step(header: StepHeader, rows: torch.Tensor,
                engine: EngineInfo | None = None) -> list[bytes | memoryview]:
    """Frames for one step; ``rows`` must be a CPU tensor of the header's shape and dtype.
    ``engine``: the step's engine info when the header does not carry it."""
    info = header.engine or engine
    if info is None or info.engine_id != header.engine_id:
        raise WireError(f"no engine info for engine {header.engine_id[:16]}")
    expected = (len(info.layers), header.num_rows, info.hidden_size)
    if tuple(rows.shape) != expected:
        raise WireError(f"rows shape {tuple(rows.shape)} != header {expected}")
    rows = rows.contiguous()
    payload = rows.view(torch.uint8).numpy() if rows.numel() else np.empty(0, np.uint8)
    head = header.model_dump_json(exclude={"engine"} if header.engine is None else None)
    return [head.encode(), memoryview(payload).cast("B")]


def encode_heartbeat(beat: Heartbeat) -> list[bytes]:
    return [beat.model_dump_json().encode(), b""]


def encode_status(status: CaptureStatus) -> list[bytes]:
    return [status.model_dump_json().encode(), b""]


Message = (tuple[StepHeader, torch.Tensor] | tuple[Heartbeat, None]
           | tuple[CaptureStatus, None])
_HEADER = TypeAdapter(Annotated[StepHeader | Heartbeat | CaptureStatus,
                                Field(discriminator="kind")])


def decode(frames: list[bytes | memoryview],
           engines: EngineInfoCache | None = None) -> Message:
    """Parse and check one message; raise ``WireError`` for anything inconsistent.

    ``engines``: the info of the engines heard from, which steps that do not carry their
    engine's info are read against, and which learns from every message that carries it
    and is accepted. Without it every step must carry its engine's info."""
    if len(frames) != 2:
        raise WireError(f"expected 2 frames, got {len(frames)}")
    head_raw = bytes(frames[0])
    try:
        header = _HEADER.validate_json(head_raw)
    except ValidationError as exc:
        header = _step_without_bad_requests(head_raw, exc)
    if isinstance(header, CaptureStatus):
        if len(frames[1]):
            raise WireError(f"{header.kind} carries {len(frames[1])} bytes of rows")
        return header, None
    if isinstance(header, Heartbeat):
        if len(frames[1]):
            raise WireError(f"{header.kind} carries {len(frames[1])} bytes of rows")
        if engines is not None:
            header.engine = engines.check(header.engine)
            engines.remember(header.engine)
        return header, None
    carried = header.engine is not None
    info = _engine_of(header, engines)
    torch_dtype, itemsize = DTYPES[info.dtype]
    shape = (len(info.layers), header.num_rows, info.hidden_size)
    expected = shape[0] * shape[1] * shape[2] * itemsize
    payload = frames[1]
    if len(payload) != expected:
        raise WireError(f"rows frame has {len(payload)} bytes, header implies {expected}")
    if engines is not None and carried:
        engines.remember(info)
    if expected == 0:
        return header, torch.empty(shape, dtype=torch_dtype)
    flat = torch.frombuffer(bytearray(payload), dtype=torch_dtype)
    return header, flat.view(shape)


def _engine_of(header: StepHeader, engines: EngineInfoCache | None) -> EngineInfo:
    """The step's engine info, carried (checked against what that engine sent before) or
    the one stored for its id; set on the header, whose shares are checked against it."""
    if header.engine is not None:
        if engines is not None:
            header.engine = engines.check(header.engine)
        return header.engine
    info = engines.get(header.engine_id) if engines is not None else None
    if info is None:
        raise UnknownEngine(f"step {header.seq} refers to engine {header.engine_id[:16]}, "
                            f"whose info has not been received (it comes again within "
                            f"{ENGINE_INFO_EVERY_S:g} s)")
    header.refuse_beyond(info)
    header.engine = info
    return info


def _invalid(exc: ValidationError) -> WireError:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["loc"] and first["loc"][-1] == "version":
        said = first.get("input")
        return WireError(f"wire version {str(said)[:20]!r} is not one this sidecar reads "
                         f"{READ_VERSIONS}: run the same lie-detector release in vLLM and in "
                         f"the sidecar (invalid header at {where})")
    return WireError(f"invalid header at {where or 'top'}: {first['msg']}")


def _step_without_bad_requests(head_raw: bytes, exc: ValidationError) -> StepHeader:
    """A step whose only faults lie in some requests' shares, with those refused; raise
    ``WireError`` when anything else is wrong or a bad share's rows cannot be placed."""
    bad: dict[int, str] = {}
    for error in exc.errors():
        loc = error["loc"]
        if len(loc) < 3 or loc[:2] != ("step", "requests") or not isinstance(loc[2], int):
            raise _invalid(exc) from None
        where = ".".join(str(p) for p in loc[3:])
        bad.setdefault(loc[2], f"{where or 'request'}: {error['msg']}")
    raw = json.loads(head_raw)
    refused = []
    for i, reason in bad.items():
        try:
            span = _RowSpan.model_validate(raw["requests"][i])
        except (ValidationError, LookupError, TypeError):
            raise _invalid(exc) from None
        req_id = span.req_id if isinstance(span.req_id, str) and \
            len(span.req_id) <= MAX_ID_CHARS else None
        refused.append(RefusedRows(req_id=req_id, row_offset=span.row_offset,
                                   num_rows=span.num_rows, reason=one_line(reason, 200)))
    raw["requests"] = [r for i, r in enumerate(raw["requests"]) if i not in bad]
    try:
        return StepHeader.model_validate(raw, context={"refused": refused})
    except ValidationError as again:
        raise _invalid(again) from None


def now_ns() -> int:
    return time.time_ns()
