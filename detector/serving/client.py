"""A typed Python client for the sidecar's gRPC API (``liedetector.v1.Detector``).

Application code should not need the generated stubs: this module turns every reply into
frozen dataclasses (spans as character offsets into the generated text, a verdict per probe,
the request's state as an enum) and every failed call into a :class:`DetectorError` carrying
the gRPC status code and the sidecar's message. :class:`DetectorClient` blocks;
:class:`AsyncDetectorClient` is the same API on ``grpc.aio``.

    with DetectorClient("127.0.0.1:50051") as client:
        scores = client.get_scores("chatcmpl-123", wait_until_finished=True)
        for span in scores.flagged_spans:
            print(scores.text[span.char_start:span.char_end], span.score)
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.api.liedetector.v1 import detector_pb2_grpc as pb_grpc

__all__ = [
    "AsyncDetectorClient", "CaptureState", "CaptureStatus", "DetectorClient", "DetectorError",
    "Drift", "ProbeInfo", "ProbeList", "ProbeScore", "RequestState", "Scores", "ScoresUpdate",
    "Span", "TLSConfig", "TokenScore", "Verdict",
]

# A call without its own timeout waits at most this long (seconds); waits for a request to
# finish are bounded by the caller's timeout, so pass one that covers the generation.
DEFAULT_TIMEOUT_S = 10.0
# Replies carry every token of a request: allow long answers.
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class RequestState(enum.Enum):
    UNSPECIFIED = pb.REQUEST_STATE_UNSPECIFIED
    # Still generating.
    RUNNING = pb.REQUEST_STATE_RUNNING
    # Finished, every state that exists was scored.
    FINISHED = pb.REQUEST_STATE_FINISHED
    # Some rows were lost; the scores present are right (see ``incomplete_reason``).
    INCOMPLETE = pb.REQUEST_STATE_INCOMPLETE

    @property
    def done(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.INCOMPLETE)


class CaptureState(enum.Enum):
    UNSPECIFIED = pb.CAPTURE_STATE_UNSPECIFIED
    ON = pb.CAPTURE_STATE_ON
    OFF = pb.CAPTURE_STATE_OFF


class DetectorError(Exception):
    """A call the sidecar refused or could not answer: ``code`` is the gRPC status
    (NOT_FOUND for an unknown request id, UNAVAILABLE when the sidecar is down,
    DEADLINE_EXCEEDED past the timeout, ...), ``details`` the sidecar's message."""

    def __init__(self, code: grpc.StatusCode, details: str, *, method: str = "") -> None:
        self.code = code
        self.details = details
        self.method = method
        super().__init__(f"{method or 'call'}: {code.name}: {details}")


@dataclass(frozen=True)
class ProbeScore:
    probe: str
    # Calibrated probability that the token is part of a fabrication.
    probability: float
    flagged: bool
    # Whether the token's row lies outside the probe's training distribution; None for a
    # probe that ships no training summary.
    outside: bool | None = None


@dataclass(frozen=True)
class TokenScore:
    # Index among the generated tokens (0 = first generated token).
    index: int
    # Absolute position in the sequence (prompt tokens come first).
    position: int
    token_id: int
    # False when no hidden state exists for the token (the final sampled token) or its rows
    # were lost; ``scores`` is then empty.
    scored: bool
    scores: tuple[ProbeScore, ...]
    text: str
    generated_unix_nano: int

    def score(self, probe: str) -> ProbeScore | None:
        return next((s for s in self.scores if s.probe == probe), None)


@dataclass(frozen=True)
class Span:
    """A span of the generated text judged by one probe: ``kind`` "claim" (a name, number,
    date or short answer) or "sentence" (judged by the highest claim inside it)."""

    # Character offsets into the generated text, [start, end).
    char_start: int
    char_end: int
    # Generated-token indices, [start, end).
    token_start: int
    token_end: int
    text: str
    kind: str
    probe: str
    score: float
    threshold: float
    flagged: bool


@dataclass(frozen=True)
class Verdict:
    """The whole response's verdict for one probe: flagged when any claim span is."""

    probe: str
    # The highest claim score; None when no claim was scored.
    score: float | None
    threshold: float
    flagged: bool
    claims: int
    flagged_claims: int


@dataclass(frozen=True)
class Drift:
    """How far the response lies from what one probe was trained on (``detector.drift``):
    of its scored rows, how many lie outside the training summary. ``out_of_distribution``
    (more than half outside) says the probe's verdicts rest on rows unlike its training
    rows; it says nothing about whether the answer is right."""

    probe: str
    rows: int
    rows_outside: int
    outside_fraction: float
    out_of_distribution: bool


@dataclass(frozen=True)
class Scores:
    """One request's scores (``get_scores``)."""

    # The id that was asked for, and the engine's internal id it resolved to.
    request_id: str
    engine_request_id: str
    state: RequestState
    incomplete_reason: str
    num_prompt_tokens: int
    probes: tuple[str, ...]
    tokens: tuple[TokenScore, ...]
    spans: tuple[Span, ...]
    # The generated text the spans' character offsets index.
    text: str
    verdicts: tuple[Verdict, ...]
    # More than 1: the id was reused by several requests; the newest is returned.
    requests_with_id: int
    # One per probe that ships a training summary (empty for the others).
    drift: tuple[Drift, ...] = ()

    @property
    def out_of_distribution(self) -> bool:
        """Whether any probe found the response outside what it was trained on."""
        return any(d.out_of_distribution for d in self.drift)

    def drift_of(self, probe: str) -> Drift | None:
        return next((d for d in self.drift if d.probe == probe), None)

    @property
    def claims(self) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.kind == "claim")

    @property
    def flagged_spans(self) -> tuple[Span, ...]:
        return tuple(s for s in self.spans if s.flagged)

    @property
    def flagged(self) -> bool:
        return any(v.flagged for v in self.verdicts)

    def verdict(self, probe: str) -> Verdict | None:
        return next((v for v in self.verdicts if v.probe == probe), None)


@dataclass(frozen=True)
class ScoresUpdate:
    """One message of ``stream_scores``: the tokens settled since the previous one, the spans
    judged so far, and on the last message (``final``) the verdicts."""

    request_id: str
    engine_request_id: str
    state: RequestState
    incomplete_reason: str
    tokens: tuple[TokenScore, ...]
    spans: tuple[Span, ...]
    final: bool
    verdicts: tuple[Verdict, ...]
    requests_with_id: int
    # On the last message only: as in :class:`Scores`.
    drift: tuple[Drift, ...] = ()


@dataclass(frozen=True)
class ProbeInfo:
    name: str
    layers: tuple[int, ...]
    score_position: str
    aggregation: str
    calibration: str
    threshold: float
    model_name: str
    model_fingerprint: str
    path: str
    # Why the probe is loaded but inactive; empty while it scores.
    inactive_reason: str
    token_features: tuple[str, ...]

    @property
    def active(self) -> bool:
        return not self.inactive_reason


@dataclass(frozen=True)
class CaptureStatus:
    """Whether the in-engine plugin captures, as the sidecar last heard it."""

    state: CaptureState
    summary: str
    reason: str
    model: str
    pid: int
    layers: tuple[int, ...]
    capture_method: str
    seconds_since_heard: float


@dataclass(frozen=True)
class ProbeList:
    probes: tuple[ProbeInfo, ...]
    capture_status: CaptureStatus

    def get(self, name: str) -> ProbeInfo | None:
        return next((p for p in self.probes if p.name == name), None)


@dataclass(frozen=True)
class TLSConfig:
    """Server verification and, for mutual TLS, the client's own certificate (PEM files).
    ``root_certificates`` None: the system's roots."""

    root_certificates: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    # The name the server's certificate is checked against, when it differs from the
    # address's host (e.g. connecting by IP to a certificate for "sidecar").
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key must be given together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.root_certificates),
            private_key=_read(self.client_key),
            certificate_chain=_read(self.client_cert))


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


# ---- replies to dataclasses -------------------------------------------------------------

def _probe_score(m: pb.ProbeScore) -> ProbeScore:
    return ProbeScore(probe=m.probe, probability=m.probability, flagged=m.flagged,
                      outside=m.outside if m.HasField("outside") else None)


def _token(m: pb.TokenScore) -> TokenScore:
    return TokenScore(index=m.index, position=m.position, token_id=m.token_id, scored=m.scored,
                      scores=tuple(_probe_score(s) for s in m.scores), text=m.text,
                      generated_unix_nano=m.generated_unix_nano)


def _span(m: pb.Span) -> Span:
    return Span(char_start=m.char_start, char_end=m.char_end, token_start=m.token_start,
                token_end=m.token_end, text=m.text, kind=m.kind, probe=m.probe, score=m.score,
                threshold=m.threshold, flagged=m.flagged)


def _verdict(m: pb.ResponseVerdict) -> Verdict:
    return Verdict(probe=m.probe, score=None if math.isnan(m.score) else m.score,
                   threshold=m.threshold, flagged=m.flagged, claims=m.claims,
                   flagged_claims=m.flagged_claims)


def _drift(m: pb.Drift) -> Drift:
    return Drift(probe=m.probe, rows=m.rows, rows_outside=m.rows_outside,
                 outside_fraction=m.outside_fraction, out_of_distribution=m.out_of_distribution)


def _state(value: int) -> RequestState:
    try:
        return RequestState(value)
    except ValueError:  # a newer sidecar's state: not one this client can act on
        return RequestState.UNSPECIFIED


def scores_from_pb(m: pb.ScoresResponse) -> Scores:
    return Scores(request_id=m.request_id, engine_request_id=m.engine_request_id,
                  state=_state(m.state), incomplete_reason=m.incomplete_reason,
                  num_prompt_tokens=m.num_prompt_tokens, probes=tuple(m.probes),
                  tokens=tuple(_token(t) for t in m.tokens),
                  spans=tuple(_span(s) for s in m.spans), text=m.text,
                  verdicts=tuple(_verdict(v) for v in m.verdicts),
                  requests_with_id=m.requests_with_id,
                  drift=tuple(_drift(d) for d in m.drift))


def update_from_pb(m: pb.ScoresUpdate) -> ScoresUpdate:
    return ScoresUpdate(request_id=m.request_id, engine_request_id=m.engine_request_id,
                        state=_state(m.state), incomplete_reason=m.incomplete_reason,
                        tokens=tuple(_token(t) for t in m.tokens),
                        spans=tuple(_span(s) for s in m.spans), final=m.final,
                        verdicts=tuple(_verdict(v) for v in m.verdicts),
                        requests_with_id=m.requests_with_id,
                        drift=tuple(_drift(d) for d in m.drift))


def probe_from_pb(m: pb.ProbeInfo) -> ProbeInfo:
    return ProbeInfo(name=m.name, layers=tuple(m.layers), score_position=m.score_position,
                     aggregation=m.aggregation, calibration=m.calibration,
                     threshold=m.threshold, model_name=m.model_name,
                     model_fingerprint=m.model_fingerprint, path=m.path,
                     inactive_reason=m.inactive_reason,
                     token_features=tuple(m.token_features))


def _capture_status(m: pb.CaptureStatus) -> CaptureStatus:
    try:
        state = CaptureState(m.state)
    except ValueError:
        state = CaptureState.UNSPECIFIED
    return CaptureStatus(state=state, summary=m.summary, reason=m.reason, model=m.model,
                         pid=m.pid, layers=tuple(m.layers), capture_method=m.capture_method,
                         seconds_since_heard=m.seconds_since_heard)


def probes_from_pb(m: pb.ListProbesResponse) -> ProbeList:
    return ProbeList(probes=tuple(probe_from_pb(p) for p in m.probes),
                     capture_status=_capture_status(m.capture_status))


def _error(exc: grpc.RpcError, method: str) -> DetectorError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return DetectorError(code or grpc.StatusCode.UNKNOWN, details or "", method=method)


def _sync_updates(call: Any) -> Iterator[ScoresUpdate]:
    try:
        for message in call:
            yield update_from_pb(message)
    except grpc.RpcError as exc:
        raise _error(exc, "StreamScores") from None
    finally:
        call.cancel()


async def _async_updates(call: Any) -> AsyncIterator[ScoresUpdate]:
    try:
        async for message in call:
            yield update_from_pb(message)
    except grpc.RpcError as exc:
        raise _error(exc, "StreamScores") from None
    finally:
        call.cancel()


# ---- the clients --------------------------------------------------------------------------

class _Options:
    """What both clients share: the channel's credentials and options, and call metadata."""

    def __init__(self, address: str, *, tls: TLSConfig | bool | None, admin_token: str | None,
                 timeout: float, options: Sequence[tuple[str, Any]]) -> None:
        if not address:
            raise ValueError("address is required (host:port of the sidecar's gRPC server)")
        self.address = address
        self.timeout = timeout
        self.admin_token = admin_token
        config = TLSConfig() if tls is True else (tls or None)
        self.credentials = config.credentials() if config is not None else None
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES)]
        if config is not None and config.server_name:
            self.options.append(("grpc.ssl_target_name_override", config.server_name))
        self.options.extend(options)

    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()

    def deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout


class DetectorClient:
    """Blocking client. ``tls``: None or False for a plaintext channel (the sidecar's
    loopback default), True for TLS with the system's roots, or a :class:`TLSConfig`.
    ``admin_token`` is sent with ``load_probe``/``unload_probe`` only."""

    def __init__(self, address: str, *, tls: TLSConfig | bool | None = None,
                 admin_token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._opts = _Options(address, tls=tls, admin_token=admin_token, timeout=timeout,
                              options=options)
        if self._opts.credentials is not None:
            self._channel = grpc.secure_channel(address, self._opts.credentials,
                                                options=self._opts.options)
        else:
            self._channel = grpc.insecure_channel(address, options=self._opts.options)
        self._stub = pb_grpc.DetectorStub(self._channel)  # type: ignore[no-untyped-call]

    @property
    def address(self) -> str:
        return self._opts.address

    def get_scores(self, request_id: str, *, wait_until_finished: bool = False,
                   timeout: float | None = None) -> Scores:
        """One request's scores, by its response id (cmpl-..., chatcmpl-...), X-Request-Id or
        engine id. With ``wait_until_finished`` the sidecar answers once the request has
        finished, within ``timeout``."""
        try:
            reply = self._stub.GetScores(
                pb.GetScoresRequest(request_id=request_id,
                                    wait_until_finished=wait_until_finished),
                timeout=self._opts.deadline(timeout))
        except grpc.RpcError as exc:
            raise _error(exc, "GetScores") from None
        return scores_from_pb(reply)

    def stream_scores(self, request_id: str, *,
                      timeout: float | None = None) -> Iterator[ScoresUpdate]:
        """Token scores as they are settled; ends after the update marked ``final``.
        ``timeout`` bounds the whole stream (None: no bound).

        The call starts here, not at the first ``next()``: a stream opened before its
        request is sent is open on the sidecar, which waits for the id to appear. Leaving
        the loop early (``break``, ``close()``) cancels the call."""
        call = self._stub.StreamScores(pb.StreamScoresRequest(request_id=request_id),
                                       timeout=timeout)
        return _sync_updates(call)

    def list_probes(self, *, timeout: float | None = None) -> ProbeList:
        try:
            reply = self._stub.ListProbes(pb.ListProbesRequest(),
                                          timeout=self._opts.deadline(timeout))
        except grpc.RpcError as exc:
            raise _error(exc, "ListProbes") from None
        return probes_from_pb(reply)

    def load_probe(self, path: str | Path, *, replace: bool = False,
                   timeout: float | None = None) -> ProbeInfo:
        """Load a probe directory readable by the sidecar (an admin call)."""
        try:
            reply = self._stub.LoadProbe(pb.LoadProbeRequest(path=str(path), replace=replace),
                                         timeout=self._opts.deadline(timeout),
                                         metadata=self._opts.admin_metadata())
        except grpc.RpcError as exc:
            raise _error(exc, "LoadProbe") from None
        return probe_from_pb(reply)

    def unload_probe(self, name: str, *, timeout: float | None = None) -> bool:
        """Unload a probe by name (an admin call); True when it was loaded, False when no
        probe of that name was (the sidecar's NOT_FOUND)."""
        try:
            reply = self._stub.UnloadProbe(pb.UnloadProbeRequest(name=name),
                                           timeout=self._opts.deadline(timeout),
                                           metadata=self._opts.admin_metadata())
        except grpc.RpcError as exc:
            error = _error(exc, "UnloadProbe")
            if error.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise error from None
        return bool(reply.unloaded)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DetectorClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncDetectorClient:
    """The same API on asyncio (``grpc.aio``); create it inside the event loop it is used on."""

    def __init__(self, address: str, *, tls: TLSConfig | bool | None = None,
                 admin_token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self._opts = _Options(address, tls=tls, admin_token=admin_token, timeout=timeout,
                              options=options)
        if self._opts.credentials is not None:
            self._channel = grpc.aio.secure_channel(address, self._opts.credentials,
                                                    options=self._opts.options)
        else:
            self._channel = grpc.aio.insecure_channel(address, options=self._opts.options)
        self._stub = pb_grpc.DetectorStub(self._channel)  # type: ignore[no-untyped-call]

    @property
    def address(self) -> str:
        return self._opts.address

    async def get_scores(self, request_id: str, *, wait_until_finished: bool = False,
                         timeout: float | None = None) -> Scores:
        try:
            reply = await self._stub.GetScores(
                pb.GetScoresRequest(request_id=request_id,
                                    wait_until_finished=wait_until_finished),
                timeout=self._opts.deadline(timeout))
        except grpc.RpcError as exc:
            raise _error(exc, "GetScores") from None
        return scores_from_pb(reply)

    def stream_scores(self, request_id: str, *,
                      timeout: float | None = None) -> AsyncIterator[ScoresUpdate]:
        """``async for update in client.stream_scores(...)``; as the blocking client's, the
        call starts here (inside the running event loop)."""
        call = self._stub.StreamScores(pb.StreamScoresRequest(request_id=request_id),
                                       timeout=timeout)
        return _async_updates(call)

    async def list_probes(self, *, timeout: float | None = None) -> ProbeList:
        try:
            reply = await self._stub.ListProbes(pb.ListProbesRequest(),
                                                timeout=self._opts.deadline(timeout))
        except grpc.RpcError as exc:
            raise _error(exc, "ListProbes") from None
        return probes_from_pb(reply)

    async def load_probe(self, path: str | Path, *, replace: bool = False,
                         timeout: float | None = None) -> ProbeInfo:
        try:
            reply = await self._stub.LoadProbe(
                pb.LoadProbeRequest(path=str(path), replace=replace),
                timeout=self._opts.deadline(timeout), metadata=self._opts.admin_metadata())
        except grpc.RpcError as exc:
            raise _error(exc, "LoadProbe") from None
        return probe_from_pb(reply)

    async def unload_probe(self, name: str, *, timeout: float | None = None) -> bool:
        try:
            reply = await self._stub.UnloadProbe(
                pb.UnloadProbeRequest(name=name), timeout=self._opts.deadline(timeout),
                metadata=self._opts.admin_metadata())
        except grpc.RpcError as exc:
            error = _error(exc, "UnloadProbe")
            if error.code == grpc.StatusCode.NOT_FOUND:
                return False
            raise error from None
        return bool(reply.unloaded)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncDetectorClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
