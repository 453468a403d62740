"""The one module that touches vLLM's internals (written against vLLM 0.32, v1 engine).

Hook points, named so an upgrade is this file's work alone:

- ``GPUModelRunner.load_model`` / ``CPUModelRunner.load_model`` (wrapped, after): choose the
  capture method and attach a ``StepAssembler`` to the runner.
- ``GPUModelRunner.sample_tokens`` (wrapped, around): ``execute_model`` has just run the
  forward pass and left ``execute_model_state``; we read the step's rows and layout before
  sampling and the sampled tokens after it (directly, or when vLLM resolves the
  asynchronous output). When hybrid probes ask for token features
  (``LIE_DETECTOR_TOKEN_FEATURES``), ``execute_model_state.logits`` (raw, one row per
  request) is summarised before sampling (top-20 and log-normaliser; whole rows only for
  requests with a temperature, ``requests[id].sampling_params.temperature``) and reduced
  to the sampled tokens' features after it.
- ``GPUModelRunner.requests[req_id]`` (``CachedRequestState``), read when a request is first
  seen: ``prompt_token_ids`` and ``sampling_params.{stop, include_stop_str_in_output,
  min_tokens}`` (stop strings are matched in the API process; the sidecar applies them).

Capture methods:

- ``aux_hidden_states``: models with vLLM's EAGLE-3 interface (Llama, Qwen, ...) return the
  residual stream at chosen layers as extra graph outputs. They survive torch.compile and
  CUDA graphs, so nothing forces eager mode.
- ``forward_hook``: any other model with a ``model.layers`` list; a forward pre-hook reads
  ``hidden_states + residual`` entering layer k. Only correct in eager mode, so the hook
  refuses to attach otherwise and says which flag to set.

Every entry point is wrapped so that an exception disables capture and lets vLLM go on.
Whenever capture ends up off (a refusal at load time, or a failure mid-run), the reason is
said once in vLLM's log and, as a ``CaptureStatus``, over the channel in place of
heartbeats (``_report_off``), so the sidecar and ``lie-detector capture`` can say it too.
The one case the channel cannot carry is an unreadable channel key: without it the sidecar
refuses the connection, so only the log says why.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from detector.channel.auth import ChannelKeyError, read_key
from detector.channel.publisher import ChannelPublisher
from detector.channel.wire import (
    MAX_MODEL_CHARS,
    TORCH_TO_WIRE,
    CaptureStatus,
    EngineInfo,
    StopRule,
    now_ns,
    one_line,
)
from detector.config import default_layers
from detector.engine.capture import OpenStep, ScheduledRequest, StepAssembler
from detector.engine.token_features import token_features
from detector.settings import HookSettings

logger = logging.getLogger("detector.engine")

_ATTR = "_lie_detector"  # the runner attribute that holds our state
_OFF_ATTR = "_lie_detector_off"  # set on a runner whose capture was refused at load time
GPU_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
CPU_RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"
V2_RUNNER_MODULE = "vllm.v1.worker.gpu.model_runner"


class _RunnerCapture:
    """What the hook keeps on one model runner."""

    def __init__(self, assembler: StepAssembler, method: str, layers: list[int]) -> None:
        self.assembler = assembler
        self.method = method
        self.layers = layers
        self.hook_rows: dict[int, torch.Tensor] = {}  # forward_hook method only
        self.pending: list[OpenStep] = []
        self.enabled = True
        # Token features to compute for sampled tokens (hybrid probes); empty: none.
        self.token_features: list[str] = []

    def disable(self, why: str) -> None:
        if not self.enabled:
            return
        self.enabled = False
        reason = one_line(f"capture failed mid-run: {why}")
        logger.error("lie-detector: capture is OFF, vLLM continues unaffected: %s", reason)
        try:
            publisher = self.assembler.publisher
            if publisher.engine is not None:
                publisher.switch_off(_status_of_engine(publisher.engine, reason))
        except Exception:
            logger.exception("lie-detector: cannot report why capture is off to the sidecar")


class _CaptureOff(Exception):
    """Capture cannot run in this engine; ``str(exc)`` is the one-line reason."""


# Publishers of engines whose capture is off: they report why for the process's life.
_off_publishers: list[ChannelPublisher] = []


# --------------------------------------------------------------------------- patching
def patch_model_runner_module(module: Any, settings: HookSettings) -> None:
    """Wrap the runner class(es) defined in ``module`` (called once per module import)."""
    name = module.__name__
    if name == GPU_RUNNER_MODULE:
        cls = module.GPUModelRunner
        _wrap(cls, "load_model", _after_load_model, settings)
        _wrap_sample_tokens(cls)
        _wrap_execute_model(cls)
    elif name == CPU_RUNNER_MODULE:
        # CPUModelRunner overrides load_model; sample_tokens is inherited.
        _wrap(module.CPUModelRunner, "load_model", _after_load_model, settings)
    elif name == V2_RUNNER_MODULE:
        _wrap(module.GPUModelRunner, "load_model", _refuse_v2_runner, settings)


def _wrap(cls: type, method: str, after: Any, settings: HookSettings) -> None:
    original = cls.__dict__.get(method)
    if original is None or getattr(original, "__lie_detector__", False):
        return

    @functools.wraps(original)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            after(self, settings)
        except Exception:
            logger.exception("lie-detector: failed to attach; vLLM continues without capture")
        return result

    wrapper.__lie_detector__ = True  # type: ignore[attr-defined]
    setattr(cls, method, wrapper)


def _wrap_sample_tokens(cls: type) -> None:
    original = cls.__dict__["sample_tokens"]
    if getattr(original, "__lie_detector__", False):
        return

    @functools.wraps(original)
    def sample_tokens(self: Any, grammar_output: Any) -> Any:
        cap: _RunnerCapture | None = getattr(self, _ATTR, None)
        if cap is None or not cap.enabled or self.execute_model_state is None:
            return original(self, grammar_output)
        t0 = time.perf_counter_ns()
        step = None
        logits = None
        try:
            step = _open_step(self, cap)
            if cap.token_features:
                logits = _snapshot_logits(self)
        except Exception as exc:
            cap.disable(f"reading the step failed: {exc!r}")
        t1 = time.perf_counter_ns()
        output = original(self, grammar_output)
        if step is not None:
            step.hook_ns = t1 - t0
            try:
                _close_when_sampled(self, cap, step, output, logits)
            except Exception as exc:
                cap.disable(f"reading sampled tokens failed: {exc!r}")
        return output

    sample_tokens.__lie_detector__ = True  # type: ignore[attr-defined]
    cls.sample_tokens = sample_tokens


def _wrap_execute_model(cls: type) -> None:
    """Catch steps that schedule no tokens: vLLM runs one to tell the worker which requests
    ended (an abort, a client timeout, a stop string) when nothing else is running, and it
    returns before ``sample_tokens``. Without this the sidecar would learn of those ends
    only from its idle timeout."""
    original = cls.__dict__["execute_model"]
    if getattr(original, "__lie_detector__", False):
        return

    @functools.wraps(original)
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, scheduler_output, *args, **kwargs)
        cap: _RunnerCapture | None = getattr(self, _ATTR, None)
        if cap is not None and cap.enabled:
            try:
                if not scheduler_output.total_num_scheduled_tokens:
                    ended = [r for r in sorted(scheduler_output.finished_req_ids)
                             if cap.assembler.knows(r)]
                    cap.assembler.end_requests(ended)
            except Exception as exc:
                cap.disable(f"reading an empty step failed: {exc!r}")
        return output

    execute_model.__lie_detector__ = True  # type: ignore[attr-defined]
    cls.execute_model = execute_model


def _refuse_v2_runner(runner: Any, settings: HookSettings) -> None:
    if getattr(runner, _OFF_ATTR, False) or not _publishing_rank():
        return
    _report_off(runner, settings, "vLLM chose its V2 model runner, which this plugin does not "
                "hook yet; start vLLM with VLLM_USE_V2_MODEL_RUNNER=0 to enable capture")


def _publishing_rank() -> bool:
    """Whether this worker is tensor-parallel rank 0, the one that publishes (the residual
    stream is replicated across TP ranks)."""
    from vllm.distributed.parallel_state import get_tp_group

    try:
        return get_tp_group().rank_in_group == 0
    except Exception:  # no distributed state (a single process): this one publishes
        return True


def _report_off(runner: Any, settings: HookSettings, reason: str) -> None:
    """Say once why capture is off, in vLLM's log and over the channel (a ``CaptureStatus``
    sent in place of heartbeats by a publisher of its own). Never raises, never waits."""
    reason = one_line(reason)
    logger.error("lie-detector: capture is OFF, vLLM continues unaffected: %s", reason)
    try:
        setattr(runner, _OFF_ATTR, True)
        status = _status_of_runner(runner, reason)
        key = read_key(settings.channel_key_file) if settings.channel_key_file else None
        _off_publishers.append(ChannelPublisher(settings.channel, None, status=status,
                                                heartbeat_s=settings.heartbeat_s, key=key))
    except ChannelKeyError as exc:
        logger.error("lie-detector: cannot tell the sidecar why capture is off (%s): only this "
                     "log says it", exc)
    except Exception:
        logger.exception("lie-detector: cannot tell the sidecar why capture is off")


def _status_of_runner(runner: Any, reason: str) -> CaptureStatus:
    """A capture-off status with whatever of the engine's identity can be read."""
    facts: dict[str, Any] = {}
    try:
        model_config = runner.model_config
        facts["model"] = one_line(str(model_config.served_model_name or model_config.model),
                                  MAX_MODEL_CHARS)
        facts["model_path"] = one_line(str(model_config.model), MAX_MODEL_CHARS)
        text_config = model_config.hf_text_config
        facts["num_layers"] = _positive(text_config.num_hidden_layers)
        facts["hidden_size"] = _positive(text_config.hidden_size)
    except Exception:
        pass  # an engine that fails early may lack any of these
    base = dict(enabled=False, reason=reason, engine_id=uuid.uuid4().hex, pid=os.getpid(),
                time_ns=now_ns())
    try:
        return CaptureStatus(**base, **facts)
    except ValueError:  # a value past the wire's bounds: the reason still travels
        return CaptureStatus(**base)


def _status_of_engine(engine: EngineInfo, reason: str) -> CaptureStatus:
    return CaptureStatus(enabled=False, reason=reason, engine_id=engine.engine_id,
                         model=one_line(engine.model, MAX_MODEL_CHARS),
                         model_path=(one_line(engine.model_path, MAX_MODEL_CHARS)
                                     if engine.model_path else None),
                         pid=engine.pid, num_layers=engine.num_layers,
                         hidden_size=engine.hidden_size, time_ns=now_ns())


# --------------------------------------------------------------------------- attaching
def _positive(value: Any) -> int | None:
    """A limit of the engine's config, or None if it does not hold a usable one."""
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


def _after_load_model(runner: Any, settings: HookSettings) -> None:
    if getattr(runner, _ATTR, None) is not None or getattr(runner, _OFF_ATTR, False):
        return  # CPUModelRunner.load_model does not call super(); guard double attach
    try:
        _attach(runner, settings)
    except _CaptureOff as off:
        _report_off(runner, settings, str(off))
    except Exception as exc:
        logger.exception("lie-detector: failed to attach")
        _report_off(runner, settings, f"attaching to vLLM failed: {type(exc).__name__}: {exc}")


def _attach(runner: Any, settings: HookSettings) -> None:
    """Attach capture to ``runner``; ``_CaptureOff`` says why it cannot be."""
    from vllm.distributed.parallel_state import get_pp_group

    if not _publishing_rank():
        return
    if get_pp_group().world_size > 1:
        raise _CaptureOff("pipeline parallelism is not supported")
    if getattr(runner, "speculative_config", None) is not None:
        raise _CaptureOff("speculative decoding is not supported")

    model_config = runner.model_config
    text_config = model_config.hf_text_config
    num_layers = int(text_config.num_hidden_layers)
    hidden = int(text_config.hidden_size)
    layers = settings.layer_list or default_layers(num_layers)
    if layers[0] < 1 or layers[-1] >= num_layers:
        raise _CaptureOff(f"LIE_DETECTOR_LAYERS={settings.layers} outside 1..{num_layers - 1} "
                          f"(the model has {num_layers} layers)")
    dtype = TORCH_TO_WIRE.get(model_config.dtype)
    if dtype is None:
        raise _CaptureOff(f"dtype {model_config.dtype} not supported (supported: "
                          f"{', '.join(TORCH_TO_WIRE.values())})")

    key = None
    if settings.channel_key_file:
        try:
            key = read_key(settings.channel_key_file)
        except ChannelKeyError as exc:
            raise _CaptureOff(str(exc)) from None

    model = runner.get_model()
    method = _attach_capture(runner, model, layers)
    _key_compile_cache(runner.vllm_config, method, layers)
    engine = EngineInfo(
        engine_id=uuid.uuid4().hex,
        model=str(model_config.served_model_name or model_config.model),
        model_path=str(model_config.model),
        fingerprint=_fingerprint(str(model_config.model)),
        hidden_size=hidden,
        num_layers=num_layers,
        layers=layers,
        dtype=dtype,
        capture_method=method,
        pid=os.getpid(),
        started_at=time.time(),
        token_features=settings.token_feature_list,
        vocab_size=_positive(model_config.get_vocab_size()),
        max_model_len=_positive(model_config.max_model_len),
    )
    publisher = ChannelPublisher(
        settings.channel,
        engine,
        max_steps=settings.queue_steps,
        max_bytes=settings.queue_bytes,
        heartbeat_s=settings.heartbeat_s,
        key=key,
    )
    try:
        cap = _RunnerCapture(StepAssembler(publisher), method, layers)
        cap.token_features = settings.token_feature_list
        if method == "forward_hook":
            _install_forward_hooks(model, layers, cap)
        setattr(runner, _ATTR, cap)
    except BaseException:
        publisher.close()  # its heartbeats would say capture is on
        raise
    logger.info(
        "lie-detector: capturing layers %s of %s via %s (%s, hidden %d) -> %s",
        layers, engine.model, method, dtype, hidden, settings.channel,
    )


def _attach_capture(runner: Any, model: Any, layers: list[int]) -> str:
    """The capture method now attached to ``model``; ``_CaptureOff`` if none can be."""
    from vllm.config import CompilationMode
    from vllm.model_executor.models.interfaces import supports_eagle3

    if runner.use_aux_hidden_state_outputs:
        raise _CaptureOff("aux hidden states are already in use (by speculative decoding?)")
    if supports_eagle3(model):
        model.set_aux_hidden_state_layers(tuple(layers))
        runner.use_aux_hidden_state_outputs = True
        return "aux_hidden_states"
    eager = (
        runner.model_config.enforce_eager
        and runner.vllm_config.compilation_config.mode == CompilationMode.NONE
    )
    if not eager:
        raise _CaptureOff(
            f"{type(model).__name__} has no aux-hidden-state outputs, so capture needs forward "
            "hooks, which are only correct in eager mode: start vLLM with --enforce-eager")
    if _decoder_layers(model) is None:
        raise _CaptureOff(f"cannot find decoder layers in {type(model).__name__}")
    logger.warning("lie-detector: using forward hooks (eager mode required and in use)")
    return "forward_hook"


def capture_method_for(architectures: list[str]) -> str:
    """How the hook will capture a model with these ``config.json`` architectures, decided
    before vLLM starts so a launcher can choose eager mode where hooks need it.

    ``aux_hidden_states`` when vLLM's class for the architecture implements the EAGLE-3
    outputs, else ``forward_hook`` (also for an architecture vLLM does not list: it would
    run through the Transformers backend, which has no aux outputs). Imports vLLM's model
    registry, which takes seconds: callers cache the answer.
    """
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_eagle3

    for arch in architectures:
        cls = ModelRegistry._try_load_model_cls(arch)
        if cls is not None:
            return "aux_hidden_states" if supports_eagle3(cls) else "forward_hook"
    return "forward_hook"


def _key_compile_cache(vllm_config: Any, method: str, layers: list[int]) -> None:
    """Make vLLM's compile-cache key depend on what we capture.

    The aux outputs change the compiled graph, but vLLM keys its (AOT) compile cache by
    the vLLM config and its own environment variables only: without this, a server with the
    plugin off, or capturing other layers, could load this graph (or we theirs).
    ``additional_config`` is hashed into the key and is meant for plugins; this runs after
    the model is built and before its first (compiling) forward pass.
    """
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra["lie_detector"] = {"capture": method, "layers": list(layers)}
    else:
        logger.warning("lie-detector: additional_config is not a dict; compile cache shared")


def _decoder_layers(model: Any) -> Any:
    inner = getattr(model, "model", None)
    return getattr(inner, "layers", None)


def _install_forward_hooks(model: Any, layers: list[int], cap: _RunnerCapture) -> None:
    decoder = _decoder_layers(model)
    for k in layers:
        def pre_hook(module: Any, args: tuple, kwargs: dict, k: int = k) -> None:
            # vLLM decoder layers take (positions, hidden_states, residual).
            hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
            residual = args[2] if len(args) > 2 else kwargs.get("residual")
            cap.hook_rows[k] = hidden + residual if residual is not None else hidden.clone()

        decoder[k].register_forward_pre_hook(pre_hook, with_kwargs=True)


def _fingerprint(model_path: str) -> str | None:
    from detector.model_identity import model_fingerprint

    try:
        return model_fingerprint(model_path)
    except (OSError, ValueError):
        return None  # a hub id rather than a local folder: the sidecar checks names only


# --------------------------------------------------------------------------- per step
def _open_step(runner: Any, cap: _RunnerCapture) -> OpenStep:
    """Read rows and layout of the step whose forward pass just ran."""
    state = runner.execute_model_state
    sched = state.scheduler_output
    num_tokens = int(sched.total_num_scheduled_tokens)
    if cap.method == "aux_hidden_states":
        parts = state.aux_hidden_states
    else:
        parts = [cap.hook_rows[k] for k in cap.layers]
    if parts is None or len(parts) != len(cap.layers):
        raise RuntimeError(f"expected {len(cap.layers)} captured layers, got "
                           f"{None if parts is None else len(parts)}")
    rows = torch.stack([p[:num_tokens] for p in parts])
    ready = None
    if rows.device.type != "cpu":
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        rows, ready = host, event.synchronize

    batch = runner.input_batch
    scheduled: list[ScheduledRequest] = []
    assembler = cap.assembler
    for i, req_id in enumerate(batch.req_ids[: batch.num_reqs]):
        n = int(sched.num_scheduled_tokens.get(req_id, 0))
        if n == 0:
            continue
        prompt = stop = None
        if not assembler.knows(req_id):
            state = runner.requests[req_id]
            prompt = state.prompt_token_ids
            stop = _stop_rule(state.sampling_params)
        scheduled.append(
            ScheduledRequest(
                req_id=req_id,
                num_rows=n,
                first_position=int(batch.num_computed_tokens_cpu[i]),
                num_prompt_tokens=int(batch.num_prompt_tokens[i]),
                prompt_token_ids=prompt,
                stop=stop,
            )
        )
    return assembler.open_step(rows, scheduled, sorted(sched.finished_req_ids), ready=ready)


_stop_rules_refused = 0


def _stop_rule(params: Any) -> StopRule | None:
    """A request's stop strings (``SamplingParams.stop``, ``include_stop_str_in_output``,
    ``min_tokens``): vLLM matches them in the API process, after the engine has run past
    them, so the sidecar needs them to cut what the client never received. Read once, when
    the request is first seen. Stop strings beyond the wire's bounds (or not UTF-8) are not
    sent, so one odd request cannot make the whole step's message invalid."""
    global _stop_rules_refused
    stop = getattr(params, "stop", None)
    if not stop:
        return None
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    try:
        for text in strings:
            text.encode("utf-8")  # lone surrogates cannot travel as JSON
        return StopRule(strings=strings,
                        include_in_output=bool(params.include_stop_str_in_output),
                        min_tokens=int(params.min_tokens or 0))
    except (ValueError, TypeError, AttributeError) as exc:
        _stop_rules_refused += 1
        if _stop_rules_refused == 1 or _stop_rules_refused % 1000 == 0:
            logger.warning("lie-detector: stop strings not sent to the sidecar (%d requests "
                           "so far), it may score text past them: %s",
                           _stop_rules_refused, type(exc).__name__)
        return None


class _LogitsSnapshot(NamedTuple):
    """A step's raw logits as the features will read them after sampling: vLLM's own
    tensor (kept, not copied) for rows nothing changes in place, and copies, taken before
    sampling, of the rows the sampler or a grammar will change."""

    logits: torch.Tensor  # (num_reqs, vocab): vLLM's, one row per request in batch order
    row_of: dict[str, int]
    copies: torch.Tensor | None  # (len(copy_of), vocab)
    copy_of: dict[str, int]


_GREEDY_EPS = 1e-5  # vLLM's own: below this temperature a request is sampled greedily


def _snapshot_logits(runner: Any) -> _LogitsSnapshot | None:
    """Keep the step's raw logits (``execute_model_state.logits``) for the features,
    which are defined on the unprocessed distribution and computed later, off the engine
    thread (:func:`_deferred_features`). A grammar masks its rows in place before
    sampling; the sampler casts logits to float32 and then scales, penalises and masks
    them in place, and for float32 logits that cast is no copy. Only those rows are copied
    here; a greedy request without penalties, biases or a grammar is read from vLLM's
    tensor as it stays (a greedy row is divided by exactly 1.0)."""
    state = runner.execute_model_state
    if state.spec_decode_metadata is not None or state.logits is None:
        return None  # several rows per request: not supported (nor is speculation at all)
    batch = runner.input_batch
    req_ids = list(batch.req_ids[: batch.num_reqs])
    logits = state.logits
    if logits.dim() != 2 or logits.shape[0] < len(req_ids):
        return None  # not one row per request: no features this step (tokens unscored)
    logits = logits[: len(req_ids)]
    in_place = logits.dtype == torch.float32
    changed = [i for i, r in enumerate(req_ids)
               if _changes_logits(runner.requests.get(r), sampler=in_place)]
    copies = None
    if changed:
        copies = logits.index_select(0, torch.tensor(changed, device=logits.device))
    return _LogitsSnapshot(logits, {r: i for i, r in enumerate(req_ids)}, copies,
                           {req_ids[i]: k for k, i in enumerate(changed)})


def _changes_logits(req: Any, *, sampler: bool) -> bool:
    """Whether this request's row of the logits is changed in place before its token is
    known: by a grammar's mask, or (``sampler``: float32 logits) by its sampling options."""
    params = getattr(req, "sampling_params", None)
    if params is None:
        return True  # unknown: copy
    if getattr(params, "structured_outputs", None) is not None:
        return True
    if not sampler:
        return False
    return bool(
        params.temperature >= _GREEDY_EPS
        or getattr(params, "repetition_penalty", 1.0) != 1.0
        or getattr(params, "presence_penalty", 0.0) or getattr(params, "frequency_penalty", 0.0)
        or getattr(params, "logit_bias", None) or getattr(params, "min_tokens", 0)
        or getattr(params, "bad_words", None) or getattr(params, "allowed_token_ids", None))


def _deferred_features(cap: _RunnerCapture, snap: _LogitsSnapshot,
                       sampled: dict[str, list[int]]
                       ) -> Callable[[], dict[str, dict[str, list[float]]]] | None:
    """What the publisher's thread calls to get each request's sampled token features
    (lists by feature name): the engine thread only picks the rows. A request whose
    features are not finite is left out (the sidecar leaves that token unscored)."""
    req_ids = [r for r, toks in sampled.items() if len(toks) == 1 and r in snap.row_of]
    if not req_ids:
        return None
    names = list(cap.token_features)
    groups = []  # (tensor, its rows, the requests, their tokens): kept and copied rows
    for source, index in ((snap.logits, snap.row_of), (snap.copies, snap.copy_of)):
        mine = [r for r in req_ids if (r in snap.copy_of) == (index is snap.copy_of)]
        if mine and source is not None:
            groups.append((source, [index[r] for r in mine], mine,
                           [sampled[r][0] for r in mine]))

    def compute() -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = {}
        for source, rows, reqs, tokens in groups:
            device = source.device
            picked = source.index_select(0, torch.tensor(rows, device=device))
            values = token_features(picked, torch.tensor(tokens, device=device), names)
            for r, row in zip(reqs, values.cpu().tolist()):
                if all(math.isfinite(v) for v in row):
                    out[r] = {name: [v] for name, v in zip(names, row)}
        return out

    return compute


def _sampled_features(cap: _RunnerCapture, snap: _LogitsSnapshot,
                      sampled: dict[str, list[int]]) -> dict[str, dict[str, list[float]]]:
    """:func:`_deferred_features`, computed now."""
    compute = _deferred_features(cap, snap, sampled)
    return compute() if compute is not None else {}


def _close_when_sampled(runner: Any, cap: _RunnerCapture, step: OpenStep, output: Any,
                        logits: _LogitsSnapshot | None = None) -> None:
    from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

    if isinstance(output, ModelRunnerOutput):
        _close(runner, cap, step, output, logits)
        return
    if not isinstance(output, AsyncModelRunnerOutput):
        raise TypeError(f"unexpected sample_tokens output {type(output).__name__}")
    # Asynchronous scheduling: tokens exist once vLLM resolves the output, in step order.
    original = output.get_output

    def get_output() -> Any:
        resolved = original()
        try:
            _close(runner, cap, step, resolved, logits)
        except Exception as exc:
            cap.disable(f"reading sampled tokens failed: {exc!r}")
        return resolved

    output.get_output = get_output


def _close(runner: Any, cap: _RunnerCapture, step: OpenStep, output: Any,
           logits: _LogitsSnapshot | None = None) -> None:
    t0 = time.perf_counter_ns()
    index = output.req_id_to_index
    sampled = {
        req.req_id: list(output.sampled_token_ids[index[req.req_id]])
        for req in step.scheduled
        if req.req_id in index
    }
    step.finished.extend(_predicted_finished(runner, cap.assembler, step, sampled))
    features = _deferred_features(cap, logits, sampled) if logits is not None else None
    cap.assembler.close_step(step, sampled, hook_ns=time.perf_counter_ns() - t0,
                             token_features=features,
                             held_bytes=_held_bytes(logits) if features else 0)


def _held_bytes(snap: _LogitsSnapshot) -> int:
    return sum(t.numel() * t.element_size() for t in (snap.logits, snap.copies)
               if t is not None)


def _predicted_finished(runner: Any, assembler: StepAssembler, step: OpenStep,
                        sampled: dict[str, list[int]]) -> list[str]:
    """Requests that vLLM's scheduler will stop after this step (mirrors ``check_stop``,
    in its order: EOS, stop tokens, length, then, once ``min_tokens`` are out, repetition).

    vLLM tells the worker of a finished request only in the next step, so without this the
    sidecar would hear of every end a step late. Stop strings are matched in the API
    process and arrive as ``finished`` later.
    """
    ended = []
    max_model_len = runner.model_config.max_model_len
    for req in step.scheduled:
        tokens = sampled.get(req.req_id)
        state = runner.requests.get(req.req_id)
        if not tokens or state is None or state.sampling_params is None:
            continue
        params = state.sampling_params
        total = req.first_position + req.num_rows + len(tokens)
        num_output = total - req.num_prompt_tokens
        last = tokens[-1]
        if (
            last == params.eos_token_id
            or last in (params.stop_token_ids or ())
            or total >= max_model_len
            or (params.max_tokens is not None and num_output >= params.max_tokens)
        ):
            ended.append(req.req_id)
        elif (
            params.repetition_detection is not None
            and num_output >= params.min_tokens
            and _repeats(assembler.output_tokens(req, tokens), params.repetition_detection)
        ):
            ended.append(req.req_id)
    return ended


def _repeats(output: list[int], detection: Any) -> bool:
    """vLLM's own repetition rule; imported only for the rare request that asks for it,
    not on every step."""
    from vllm.v1.core.sched.utils import check_sequence_repetition

    return check_sequence_repetition(output, detection)
