"""gRPC service ``liedetector.v1.Detector``: scores by request id, streamed or at once.

Every RPC validates its input and answers with a status a caller can act on:
INVALID_ARGUMENT for malformed requests, NOT_FOUND for unknown request ids,
FAILED_PRECONDITION for a probe that does not fit the served model, RESOURCE_EXHAUSTED
over the stream limit, UNAUTHENTICATED / PERMISSION_DENIED for admin calls not allowed
(and PERMISSION_DENIED for a probe path outside the probe roots).

Handlers are coroutines on the asyncio server (``detector.sidecar.server``): they must not
block. Waiting for the store is awaited (``changes.StoreChanges``); CPU work and blocking
reads go to the worker pool (``_offload``). ``context`` is a ``calls.CallContext``: its
``abort`` raises, as the thread-per-call server's did, so helpers refuse a call from
anywhere.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.artifact import (
    ProbeArtifactError,
    ProbeMismatchError,
    ProbePathError,
    probe_dir_within,
)
from detector.claims import ResponseVerdict
from detector.sidecar.analysis import Analyzer
from detector.sidecar.views import RequestAnalysis
from detector.sidecar.changes import StoreChanges
from detector.sidecar.fanout import UpdateBatcher
from detector.sidecar.incremental import StreamCursor
from detector.sidecar.pool import ElasticThreadPool
from detector.sidecar.registry import HeardCapture, LoadedProbe, ProbeRegistry
from detector.sidecar.security import AdminGuard
from detector.sidecar.spans import SpanVerdict
from detector.sidecar.records import RequestRecord
from detector.sidecar.scores import ProbeColumns
from detector.sidecar.store import RequestStore

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name
# A health entry of its own: SERVING while the in-engine hook is heard from. Kept apart from
# the overall status, so a sidecar that starts before vLLM is ready without a hook.
HOOK_HEALTH_NAME = "liedetector.v1.Hook"
# Ids clients chose can be long (vLLM takes headers up to 4 MB); a long one is looked up by
# the bounded form the hook sent (detector.channel.ids).
MAX_ID_LENGTH = 1 << 17

T = TypeVar("T")


@dataclass
class _Sent:
    """What a stream has sent: tokens, closed spans (each once: ``cursor``), the record
    version it read last, and whether that was the end."""

    tokens: int = 0
    cursor: StreamCursor = field(default_factory=StreamCursor)
    version: int = -1
    done: bool = False


class DetectorService(pb_grpc.DetectorServicer):
    def __init__(self, store: RequestStore, registry: ProbeRegistry, analyzer: Analyzer, *,
                 max_streams: int = 256, stream_interval_s: float = 0.05,
                 appear_wait_s: float = 60.0, admin: AdminGuard | None = None,
                 probe_roots: Sequence[Path] = ()) -> None:
        self.store = store
        self.registry = registry
        self.analyzer = analyzer
        self.admin = admin or AdminGuard()
        # LoadProbe reads only under these folders: the admin token lets a caller choose
        # which probe scores, not read any file the sidecar can.
        self.probe_roots = tuple(probe_roots)
        self.max_streams = max_streams
        # Where handlers' CPU work and blocking reads run (``server.GrpcServer`` sets it;
        # None: on the caller's thread).
        self.workers: ElasticThreadPool | None = None
        # Waiting coroutines hear of the store's changes through this (bound to the loop by
        # ``server.GrpcServer``).
        self.changes = StoreChanges()
        store.on_change(self.changes.notify)
        # Streams woken by the same step compute their updates in one worker call.
        self.updates = UpdateBatcher(self._offload)
        # At most one update per interval per stream: steps that land meanwhile go out
        # together, which keeps many streams off the scoring thread's back (a lagging
        # sidecar makes the hook drop steps) however fast the engine steps.
        self.stream_interval_s = stream_interval_s
        # A stream opened as its request is sent waits (within the client's deadline) this
        # long for the first step: under load a request can sit in vLLM's queue for long.
        self.appear_wait_s = appear_wait_s
        self._open = {"streams": 0, "waits": 0}
        self._streams_lock = threading.Lock()

    # ----------------------------------------------------------------- scores
    async def GetScores(self, request: pb.GetScoresRequest, context: grpc.ServicerContext
                        ) -> pb.ScoresResponse:
        request_id = _check_id(request.request_id, context)
        if not request.wait_until_finished:
            return await self._get_scores(request, request_id, context)
        # A call that waits is capped like a stream, apart.
        with self._long_call(context, "waits"):
            return await self._get_scores(request, request_id, context)

    async def _get_scores(self, request: pb.GetScoresRequest, request_id: str,
                          context: grpc.ServicerContext) -> pb.ScoresResponse:
        wait_s = _budget(context) if request.wait_until_finished else 0.0
        deadline = time.monotonic() + wait_s
        await self._await_known(request_id, wait_s, context)
        # Resolved once: a newer request that takes the id meanwhile is not this one.
        engine_id, sharing = self._resolve(request_id, context)
        if request.wait_until_finished:
            await self.changes.wait_for(
                lambda: self.store.wait(engine_id, until_finished=True, timeout_s=0),
                max(0.0, deadline - time.monotonic()))
        return await self._offload(self._scores, request_id, engine_id, sharing, context)

    def _scores(self, request_id: str, engine_id: str, sharing: int,
                context: grpc.ServicerContext) -> pb.ScoresResponse:
        """The request's scores as they stand now (a worker thread: CPU work)."""
        analysis = self.analyzer.current(self.store, engine_id)
        if analysis is None:
            context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(request_id))
        columns = self.store.columns
        record = analysis.record
        return pb.ScoresResponse(
            request_id=request_id,
            engine_request_id=record.req_id,
            state=_state(record),
            incomplete_reason=record.incomplete or "",
            num_prompt_tokens=record.num_prompt_tokens,
            probes=list(columns.names if columns else ()),
            tokens=_tokens(analysis, 0, len(analysis.tokens), columns),
            spans=[_span(v) for v in analysis.verdicts],
            text=analysis.text,
            verdicts=[_verdict(r) for r in analysis.responses],
            requests_with_id=sharing,
            drift=_drift(analysis),
        )

    async def StreamScores(self, request: pb.StreamScoresRequest,
                           context: grpc.ServicerContext) -> AsyncIterator[pb.ScoresUpdate]:
        request_id = _check_id(request.request_id, context)
        with self._long_call(context, "streams"):
            async for update in self._stream(request_id, context):
                yield update

    @contextmanager
    def _long_call(self, context: grpc.ServicerContext, kind: str) -> Iterator[None]:
        """A slot for a call that stays open: at most ``max_streams`` streams and as many
        waits, which bounds the re-judging work (and memory) open calls can ask for."""
        with self._streams_lock:
            if self._open[kind] >= self.max_streams:
                what = "open streams" if kind == "streams" else "calls waiting for the end"
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"too many {what} (limit {self.max_streams})")
            self._open[kind] += 1
        try:
            yield
        finally:
            with self._streams_lock:
                self._open[kind] -= 1

    @property
    def open_calls(self) -> int:
        """Streams and waits open now."""
        with self._streams_lock:
            return sum(self._open.values())

    async def _stream(self, request_id: str, context: grpc.ServicerContext
                      ) -> AsyncIterator[pb.ScoresUpdate]:
        await self._await_known(request_id, min(self.appear_wait_s, _budget(context)),
                                context)
        # The stream follows the request the id names now, even if a newer one takes it.
        engine_id, sharing = self._resolve(request_id, context)
        sent = _Sent()
        while context.is_active():
            update = await self.updates.submit(functools.partial(
                self._update, request_id, engine_id, sharing, sent, context))
            if update is not None:
                yield update
            if sent.done:
                return
            if update is not None:
                # Steps that land meanwhile go out together in the next update. Paused
                # before waiting: a stream in its pause is not woken by every step.
                await asyncio.sleep(min(self.stream_interval_s, _budget(context)))
            await self.changes.wait_for(lambda: self.store.moved_on(engine_id, sent.version),
                                        min(0.5, _budget(context)))

    def _update(self, request_id: str, engine_id: str, sharing: int, sent: _Sent,
                context: grpc.ServicerContext) -> pb.ScoresUpdate | None:
        """The stream's next update from the store now (None: nothing new), noted in
        ``sent`` (a worker thread: CPU work)."""
        # Only tokens whose scores are final while it runs, every token once it ended.
        analysis = self.analyzer.current(self.store, engine_id, stream=True)
        if analysis is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"request {_shown(request_id)} expired while streaming")
        record = analysis.stored
        done = record.finished
        columns = self.store.columns
        n = len(analysis.tokens)
        closed = sent.cursor.closed(analysis, done)
        sent.version, sent.done = record.version, done
        if not (n > sent.tokens or closed or done):
            return None
        update = pb.ScoresUpdate(
            request_id=request_id,
            engine_request_id=record.req_id,
            state=_state(record),
            incomplete_reason=record.incomplete or "",
            tokens=_tokens(analysis, sent.tokens, n, columns),
            spans=[_span(v) for v in closed],
            final=done,
            verdicts=[_verdict(r) for r in analysis.responses] if done else [],
            requests_with_id=sharing,
            drift=_drift(analysis) if done else [],
        )
        sent.tokens = n
        return update

    # ----------------------------------------------------------------- probes
    async def ListProbes(self, request: pb.ListProbesRequest, context: grpc.ServicerContext
                         ) -> pb.ListProbesResponse:
        return pb.ListProbesResponse(probes=[_probe_info(p, self.registry.target_fpr) for p in self.registry.probes()],
                                     capture_status=_capture_status(self.registry.capture()))

    async def LoadProbe(self, request: pb.LoadProbeRequest, context: grpc.ServicerContext
                        ) -> pb.ProbeInfo:
        self.admin.check(context, "LoadProbe")
        if not request.path or len(request.path) > 4096:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path must be a probe directory")
        try:
            path = probe_dir_within(request.path, self.probe_roots)
            loaded = await self._offload(self.registry.load, path, replace=request.replace)
        except ProbePathError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ProbeMismatchError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ProbeArtifactError as exc:
            code = (grpc.StatusCode.ALREADY_EXISTS if "already loaded" in str(exc)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(exc))
        return _probe_info(loaded, self.registry.target_fpr)

    async def UnloadProbe(self, request: pb.UnloadProbeRequest,
                          context: grpc.ServicerContext) -> pb.UnloadProbeResponse:
        self.admin.check(context, "UnloadProbe")
        if not request.name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        if not await self._offload(self.registry.unload, request.name):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no probe named {request.name!r}")
        return pb.UnloadProbeResponse(unloaded=True)

    # ----------------------------------------------------------------- helpers
    async def _offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread: CPU work and blocking reads keep off
        the event loop, which answers every call (health checks too)."""
        if self.workers is None:
            return fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(
            self.workers, functools.partial(fn, *args, **kwargs))

    def _unknown(self, request_id: str) -> str:
        """NOT_FOUND's message; it says why nothing is captured when capture is off."""
        message = f"request {_shown(request_id)} is not known (never seen, or expired)"
        capture = self.registry.capture()
        if capture.off is not None:
            message += f"; {capture.summary()}"
        return message

    def _resolve(self, request_id: str, context: grpc.ServicerContext) -> tuple[str, int]:
        """The engine id ``request_id`` names (the newest request known by it) and how many
        share it. An id that several running requests share (a reused X-Request-Id) names
        none of them: FAILED_PRECONDITION, rather than one caller's scores for another's."""
        engine_id, sharing, running = self.store.resolve_shared(request_id)
        if running > 1:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"request id {_shown(request_id)} names {running} requests running "
                          f"now (a reused X-Request-Id); ask by a unique one (the engine "
                          f"request id, or the lie_detector annotation's request_id)")
        return engine_id, sharing

    async def _await_known(self, request_id: str, wait_s: float,
                           context: grpc.ServicerContext) -> None:
        # Woken by the step that first mentions the id; a client that goes away cancels
        # the wait (the server cancels the call's task).
        if not await self.changes.wait_for(lambda: self.store.wait_known(request_id, 0),
                                           wait_s):
            context.abort(grpc.StatusCode.NOT_FOUND, self._unknown(request_id))


def _tokens(analysis: RequestAnalysis, start: int, end: int, columns: ProbeColumns | None
            ) -> list[pb.TokenScore]:
    thresholds = dict(zip(columns.names, columns.thresholds)) if columns else {}
    decoded = analysis.decoded
    out = []
    for i in range(start, end):
        token = analysis.tokens[i]
        out.append(pb.TokenScore(
            index=i,
            position=token.position,
            token_id=token.token_id,
            scored=bool(token.scores),
            scores=[pb.ProbeScore(probe=name, probability=p,
                                  flagged=p >= thresholds.get(name, float("inf")),
                                  outside=token.outside.get(name))
                    for name, p in token.scores.items()],
            text=decoded.text[decoded.starts[i]:decoded.ends[i]] if decoded else "",
            generated_unix_nano=token.generated_ns,
        ))
    return out


def _span(v: SpanVerdict) -> pb.Span:
    s = v.span
    return pb.Span(char_start=s.char_start, char_end=s.char_end, token_start=s.token_start,
                   token_end=s.token_end, text=s.text, kind=s.kind, probe=v.probe,
                   score=v.score, threshold=v.threshold, flagged=v.flagged)


def _drift(analysis: RequestAnalysis) -> list[pb.Drift]:
    return [pb.Drift(probe=d.probe, rows=d.rows, rows_outside=d.rows_outside,
                     outside_fraction=d.fraction, out_of_distribution=d.out_of_distribution)
            for d in analysis.drift]


def _verdict(r: ResponseVerdict) -> pb.ResponseVerdict:
    return pb.ResponseVerdict(probe=r.probe, score=r.score, threshold=r.threshold,
                              flagged=r.flagged, claims=r.claims,
                              flagged_claims=r.flagged_claims)


def _state(record: RequestRecord) -> int:
    if record.incomplete:
        return pb.REQUEST_STATE_INCOMPLETE
    return pb.REQUEST_STATE_FINISHED if record.finished else pb.REQUEST_STATE_RUNNING


def _shown(request_id: str) -> str:
    """An id for a message: quoted, long ones cut."""
    return repr(request_id if len(request_id) <= 80 else request_id[:77] + "...")


def _check_id(request_id: str, context: grpc.ServicerContext) -> str:
    if not request_id or len(request_id) > MAX_ID_LENGTH or not request_id.isprintable():
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"request_id must be 1-{MAX_ID_LENGTH} printable characters")
    return request_id


def _budget(context: grpc.ServicerContext) -> float:
    remaining = context.time_remaining()
    return 60.0 if remaining is None else max(0.0, remaining - 0.05)


def _capture_status(capture: HeardCapture) -> pb.CaptureStatus:
    if capture.off is not None:
        off = capture.off
        return pb.CaptureStatus(state=pb.CAPTURE_STATE_OFF, summary=capture.summary(),
                                reason=off.reason, model=off.model, pid=off.pid,
                                seconds_since_heard=time.monotonic() - capture.heard_at)
    if capture.engine is not None:
        engine = capture.engine
        return pb.CaptureStatus(state=pb.CAPTURE_STATE_ON, summary=capture.summary(),
                                model=engine.model, pid=engine.pid, layers=engine.layers,
                                capture_method=engine.capture_method)
    return pb.CaptureStatus(state=pb.CAPTURE_STATE_UNSPECIFIED)


def _probe_info(loaded: LoadedProbe, target_fpr: float | None = None) -> pb.ProbeInfo:
    """A probe as ListProbes shows it; ``threshold`` is what its claims are judged with
    (a verdict's, at the sidecar's target false-flag rate, when the probe has one)."""
    meta = loaded.artifact.metadata
    threshold = (meta.verdict.threshold_for(target_fpr) if meta.verdict is not None
                 else meta.threshold)
    return pb.ProbeInfo(
        name=meta.name,
        layers=meta.layers,
        score_position=meta.score_position,
        aggregation=meta.aggregation,
        calibration=meta.calibration,
        threshold=threshold,
        model_name=meta.model.name,
        model_fingerprint=meta.model.fingerprint,
        path=loaded.path,
        inactive_reason=loaded.inactive_reason,
        token_features=meta.token_features,
    )
