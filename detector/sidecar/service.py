"""gRPC service ``liedetector.v1.Detector``: scores by request id, streamed or at once.

Every RPC validates its input and answers with a status a caller can act on:
INVALID_ARGUMENT for malformed requests, NOT_FOUND for unknown request ids,
FAILED_PRECONDITION for a probe that does not fit the served model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc
from detector.artifact import ProbeArtifactError, ProbeMismatchError
from detector.sidecar.registry import LoadedProbe, ProbeRegistry
from detector.sidecar.streams import RequestRecord, RequestStore, TokenScore

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detector"].full_name
MAX_ID_LENGTH = 512
APPEAR_WAIT_S = 10.0  # how long a read waits for a request id the sidecar has not seen yet


class DetectorService(pb_grpc.DetectorServicer):
    def __init__(self, store: RequestStore, registry: ProbeRegistry) -> None:
        self.store = store
        self.registry = registry

    # ----------------------------------------------------------------- scores
    def GetScores(self, request: pb.GetScoresRequest, context: grpc.ServicerContext
                  ) -> pb.ScoresResponse:
        request_id = _check_id(request.request_id, context)
        wait_s = _budget(context) if request.wait_until_finished else 0.0
        deadline = time.monotonic() + wait_s
        self._await_known(request_id, wait_s, context)
        if request.wait_until_finished:
            self.store.wait(request_id, until_finished=True,
                            timeout_s=max(0.0, deadline - time.monotonic()))
        snap = self.store.snapshot(request_id)
        if snap is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is not known "
                          "(never seen, or expired)")
        record, tokens = snap
        names = self.store.columns.names if self.store.columns else ()
        return pb.ScoresResponse(
            request_id=request_id,
            engine_request_id=record.req_id,
            state=_state(record),
            incomplete_reason=record.incomplete or "",
            num_prompt_tokens=record.num_prompt_tokens,
            probes=list(names),
            tokens=[self._token(i, t) for i, t in enumerate(tokens)],
        )

    def StreamScores(self, request: pb.StreamScoresRequest, context: grpc.ServicerContext
                     ) -> Iterator[pb.ScoresUpdate]:
        request_id = _check_id(request.request_id, context)
        self._await_known(request_id, min(APPEAR_WAIT_S, _budget(context)), context)
        sent = 0
        while context.is_active():
            snap = self.store.snapshot(request_id)
            if snap is None:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"request {request_id!r} expired while streaming")
            record, tokens = snap
            done = record.finished
            settled = len(tokens) if done else _settled_prefix(tokens, self.store)
            if settled > sent or done:
                yield pb.ScoresUpdate(
                    request_id=request_id,
                    engine_request_id=record.req_id,
                    state=_state(record),
                    incomplete_reason=record.incomplete or "",
                    tokens=[self._token(i, tokens[i]) for i in range(sent, settled)],
                    final=done,
                )
                sent = settled
            if done:
                return
            self.store.wait(request_id, after_version=record.version, timeout_s=0.5)

    # ----------------------------------------------------------------- probes
    def ListProbes(self, request: pb.ListProbesRequest, context: grpc.ServicerContext
                   ) -> pb.ListProbesResponse:
        return pb.ListProbesResponse(probes=[_probe_info(p) for p in self.registry.probes()])

    def LoadProbe(self, request: pb.LoadProbeRequest, context: grpc.ServicerContext
                  ) -> pb.ProbeInfo:
        if not request.path or len(request.path) > 4096:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "path must be a probe directory")
        try:
            loaded = self.registry.load(request.path, replace=request.replace)
        except ProbeMismatchError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except ProbeArtifactError as exc:
            code = (grpc.StatusCode.ALREADY_EXISTS if "already loaded" in str(exc)
                    else grpc.StatusCode.INVALID_ARGUMENT)
            context.abort(code, str(exc))
        return _probe_info(loaded)

    def UnloadProbe(self, request: pb.UnloadProbeRequest, context: grpc.ServicerContext
                    ) -> pb.UnloadProbeResponse:
        if not request.name:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is required")
        if not self.registry.unload(request.name):
            context.abort(grpc.StatusCode.NOT_FOUND, f"no probe named {request.name!r}")
        return pb.UnloadProbeResponse(unloaded=True)

    # ----------------------------------------------------------------- helpers
    def _await_known(self, request_id: str, wait_s: float, context: grpc.ServicerContext) -> None:
        deadline = time.monotonic() + wait_s
        while self.store.resolve(request_id) is None:
            if time.monotonic() >= deadline or not context.is_active():
                context.abort(grpc.StatusCode.NOT_FOUND, f"request {request_id!r} is not known "
                              "(never seen, or expired)")
            time.sleep(0.05)

    def _token(self, index: int, token: TokenScore) -> pb.TokenScore:
        thresholds = {}
        columns = self.store.columns
        if columns is not None:
            thresholds = dict(zip(columns.names, columns.thresholds))
        return pb.TokenScore(
            index=index,
            position=token.position,
            token_id=token.token_id,
            scored=bool(token.scores),
            scores=[
                pb.ProbeScore(probe=name, probability=p,
                              flagged=p >= thresholds.get(name, float("inf")))
                for name, p in token.scores.items()
            ],
        )


def _settled_prefix(tokens: list[TokenScore], store: RequestStore) -> int:
    """Tokens that already have every active probe's score (later rows cannot change them)."""
    want = len(store.columns.names) if store.columns else 0
    n = 0
    for token in tokens:
        if len(token.scores) < want:
            break
        n += 1
    return n


def _state(record: RequestRecord) -> int:
    if record.incomplete:
        return pb.REQUEST_STATE_INCOMPLETE
    return pb.REQUEST_STATE_FINISHED if record.finished else pb.REQUEST_STATE_RUNNING


def _check_id(request_id: str, context: grpc.ServicerContext) -> str:
    if not request_id or len(request_id) > MAX_ID_LENGTH or not request_id.isprintable():
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"request_id must be 1-{MAX_ID_LENGTH} printable characters")
    return request_id


def _budget(context: grpc.ServicerContext) -> float:
    remaining = context.time_remaining()
    return 60.0 if remaining is None else max(0.0, remaining - 0.05)


def _probe_info(loaded: LoadedProbe) -> pb.ProbeInfo:
    meta = loaded.artifact.metadata
    return pb.ProbeInfo(
        name=meta.name,
        layers=meta.layers,
        score_position=meta.score_position,
        aggregation=meta.aggregation,
        calibration=meta.calibration,
        threshold=meta.threshold,
        model_name=meta.model.name,
        model_fingerprint=meta.model.fingerprint,
        path=loaded.path,
        inactive_reason=loaded.inactive_reason,
    )


def build_server(service: DetectorService, address: str, *, max_workers: int = 16
                 ) -> tuple[grpc.Server, health.HealthServicer, int]:
    """A gRPC server with the detector, the standard health service and reflection."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", 1 << 20)],
    )
    pb_grpc.add_DetectorServicer_to_server(service, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer, port
