"""Verdicts in the client's own OpenAI response: an ASGI middleware for vLLM's API server.

    vllm serve MODEL --middleware detector.openai_middleware.LieDetectorMiddleware

(``lie-detector serve`` adds it.) A request that carries ``X-Lie-Detector: annotate`` to
``/v1/completions`` or ``/v1/chat/completions`` gets the sidecar's verdict in its response:

* not streamed: one more top-level field, ``"lie_detector"``, spliced into vLLM's own JSON
  (every other byte as vLLM wrote it; Content-Length fixed) and the header
  ``X-Lie-Detector-Verdict: ok``;
* streamed: vLLM's events pass through as they come; the ``data: [DONE]`` event is held back
  and preceded by one event ``data: {"lie_detector": {...}}``.

Every other request is handed to vLLM untouched. The middleware fails open: when the
sidecar is absent, errs, or has no final scores within ``LIE_DETECTOR_ANNOTATE_TIMEOUT_S``,
or anything here raises, a non-streamed response goes out as vLLM wrote it with
``X-Lie-Detector-Verdict: unavailable`` and ``X-Lie-Detector-Reason``; a streamed one (its
headers are already sent) says ``"status": "unavailable"`` in its final event. Never an
HTTP error, never a wait beyond the bound.

Span offsets index the text the client got (``choices[0].text`` or
``choices[0].message.content``): where the sidecar's decode differs, each span is placed
again by its text near its offset, and spans that cannot be are dropped and counted
(``spans_dropped``). Settings are ``LIE_DETECTOR_ANNOTATE_*`` environment variables
(:class:`AnnotateSettings`). Nothing here logs prompt or completion text.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from detector.client import AsyncDetectorClient, DetectorError, Scores, Span, TLSConfig
from detector.log_throttle import LogThrottle

__all__ = ["AnnotateSettings", "LieDetectorMiddleware", "annotation", "place_spans"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HEADER = b"x-lie-detector"
ANNOTATE = b"annotate"
VERDICT_HEADER = b"x-lie-detector-verdict"
REASON_HEADER = b"x-lie-detector-reason"
FIELD = "lie_detector"
PATHS = ("/v1/completions", "/v1/chat/completions")
DONE = b"data: [DONE]"
# Past the bound on the sidecar call (which the gRPC deadline enforces), a little for the
# reply to be decoded before the middleware stops waiting regardless.
_GRACE_S = 0.25


class AnnotateSettings(BaseSettings):
    """Every field is ``LIE_DETECTOR_ANNOTATE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LIE_DETECTOR_ANNOTATE_", extra="ignore")

    # The sidecar's gRPC address (``lie-detector serve`` sets it).
    grpc_address: str = "127.0.0.1:50051"
    # The longest an annotated response waits for final scores after vLLM finished it.
    timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Annotate nothing (every request passes straight through).
    disable: bool = False
    # TLS to the sidecar (its default is plaintext on loopback): on with the system's roots,
    # or with the files below (PEM).
    tls: bool = False
    tls_root_certificates: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    tls_server_name: str | None = None

    def tls_config(self) -> TLSConfig | None:
        if not (self.tls or self.tls_root_certificates or self.tls_client_cert):
            return None
        return TLSConfig(root_certificates=self.tls_root_certificates,
                         client_cert=self.tls_client_cert, client_key=self.tls_client_key,
                         server_name=self.tls_server_name)


class Unavailable(Exception):
    """No verdict for this response: ``code`` goes in the reason header, ``detail`` in the
    final event's ``reason``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


# ---- spans placed in the returned text ------------------------------------------------------

def _window_shift(sidecar_text: str, returned: str) -> int:
    """Where the sidecar's text most likely starts in the returned text (echo puts the
    prompt first)."""
    if not sidecar_text or sidecar_text == returned:
        return 0
    if returned.endswith(sidecar_text):
        return len(returned) - len(sidecar_text)
    found = returned.find(sidecar_text)
    return found if found >= 0 else 0


def place_spans(spans: Sequence[Span], sidecar_text: str,
                returned: str) -> tuple[list[Span], int]:
    """The spans with offsets into ``returned`` (the client's text), and how many could not
    be placed. Equal texts keep the offsets; otherwise each span is looked for by its text
    nearest its expected offset, within the texts' length difference plus a margin."""
    shift = _window_shift(sidecar_text, returned)
    slack = abs(len(returned) - shift - len(sidecar_text)) + 16
    placed: list[Span] = []
    dropped = 0
    for span in spans:
        text = span.text
        expected = span.char_start + shift
        if not text:
            dropped += 1
            continue
        if returned[expected:expected + len(text)] == text:
            start: int | None = expected
        else:
            start = _nearest(returned, text, expected, slack)
        if start is None:
            dropped += 1
            continue
        placed.append(Span(char_start=start, char_end=start + len(text),
                           token_start=span.token_start, token_end=span.token_end, text=text,
                           kind=span.kind, probe=span.probe, score=span.score,
                           threshold=span.threshold, flagged=span.flagged))
    return placed, dropped


def _nearest(haystack: str, needle: str, expected: int, slack: int) -> int | None:
    lo = max(0, expected - slack)
    hi = min(len(haystack), expected + len(needle) + slack)
    best: int | None = None
    at = haystack.find(needle, lo, hi)
    while at >= 0:
        if best is None or abs(at - expected) < abs(best - expected):
            best = at
        at = haystack.find(needle, at + 1, hi)
    return best


# ---- the field ------------------------------------------------------------------------------

def annotation(scores: Scores, returned: str) -> dict[str, Any]:
    """The ``lie_detector`` field for a response whose text is ``returned``: the verdict per
    probe and the claim spans, offsets into ``returned``."""
    spans, dropped = place_spans(scores.claims, scores.text, returned)
    return {
        "status": "ok",
        "request_id": scores.request_id,
        "state": scores.state.name,
        "incomplete_reason": scores.incomplete_reason,
        "flagged": scores.flagged,
        "verdicts": [{"probe": v.probe, "score": v.score, "threshold": v.threshold,
                      "flagged": v.flagged, "claims": v.claims,
                      "flagged_claims": v.flagged_claims} for v in scores.verdicts],
        "spans": [{"char_start": s.char_start, "char_end": s.char_end, "text": s.text,
                   "probe": s.probe, "score": s.score, "threshold": s.threshold,
                   "flagged": s.flagged} for s in spans],
        "spans_dropped": dropped,
        # Per probe that ships a training summary: how many scored rows lie outside it.
        "out_of_distribution": scores.out_of_distribution,
        "drift": [{"probe": d.probe, "rows": d.rows, "rows_outside": d.rows_outside,
                   "outside_fraction": d.outside_fraction,
                   "out_of_distribution": d.out_of_distribution} for d in scores.drift],
    }


def unavailable(code: str, detail: str) -> dict[str, Any]:
    return {"status": "unavailable", "reason": code, "detail": detail}


@dataclass
class _Request:
    """What the middleware needs of the client's request body."""

    n: int = 1
    parsed: bool = True


def _parse_request(body: bytes) -> _Request:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _Request(parsed=False)
    if not isinstance(data, dict):
        return _Request(parsed=False)
    n = data.get("n")
    return _Request(n=n if isinstance(n, int) and not isinstance(n, bool) else 1)


def _choice_text(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        return None
    text = choice.get("text")
    if isinstance(text, str):
        return text
    message = choice.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        content: str = message["content"]
        return content
    return None


@dataclass
class _StreamState:
    """What the middleware reads of a streamed response as it passes by."""

    response_id: str | None = None
    texts: dict[int, list[str]] = field(default_factory=dict)
    error: str | None = None
    buffer: bytes = b""

    def feed(self, data: bytes) -> None:
        self.buffer += data
        *events, self.buffer = self.buffer.split(b"\n\n")
        for event in events:
            self._event(event)

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if not payload or payload == b"[DONE]":
                continue
            try:
                data = json.loads(payload)
            except ValueError:
                self.error = "an event that is not JSON"
                continue
            if not isinstance(data, dict):
                continue
            if "error" in data:
                self.error = "vLLM sent an error event"
                continue
            if self.response_id is None and isinstance(data.get("id"), str):
                self.response_id = data["id"]
            for choice in data.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                index = choice.get("index", 0)
                piece = choice.get("text")
                if piece is None and isinstance(choice.get("delta"), dict):
                    piece = choice["delta"].get("content")
                parts = self.texts.setdefault(index if isinstance(index, int) else -1, [])
                if isinstance(piece, str):
                    parts.append(piece)


# ---- the middleware -------------------------------------------------------------------------

class LieDetectorMiddleware:
    """Pure ASGI; ``app.add_middleware(LieDetectorMiddleware)`` (vLLM's ``--middleware``)."""

    def __init__(self, app: ASGIApp, settings: AnnotateSettings | None = None) -> None:
        self.app = app
        self.settings: AnnotateSettings | None
        self.config_error = ""
        try:
            self.settings = settings if settings is not None else AnnotateSettings()
            tls = self.settings.tls_config()
            if tls is not None:
                tls.credentials()  # unreadable certificates: said now, not per request
        except (ValidationError, ValueError, OSError) as exc:
            self.settings = None
            self.config_error = f"{type(exc).__name__}"
            logger.error("lie-detector annotations are off: bad LIE_DETECTOR_ANNOTATE_* "
                         "settings (%s)", exc)
        self._client: AsyncDetectorClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._throttle = LogThrottle(10.0)
        self.unavailable_total = 0
        if self.settings is not None and not self.settings.disable:
            logger.info("lie-detector annotations on (sidecar %s, bound %.1f s)",
                        self.settings.grpc_address, self.settings.timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._wants(scope):
            await self.app(scope, receive, send)
            return
        await self._annotated(scope, receive, send)

    def _wants(self, scope: Scope) -> bool:
        try:
            if scope.get("type") != "http" or scope.get("method") != "POST":
                return False
            if scope.get("path") not in PATHS:
                return False
            for name, value in scope.get("headers") or ():
                if name.lower() == HEADER and value.strip().lower() == ANNOTATE:
                    return not (self.settings is not None and self.settings.disable)
        except Exception:  # an odd scope is vLLM's to answer, not ours
            return False
        return False

    # -- one annotated exchange

    async def _annotated(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The request body is read first (it says n), then replayed to vLLM as one message.
        chunks: list[bytes] = []
        pending: list[Message] = []
        while True:
            message = await receive()
            if message.get("type") != "http.request":
                pending.append(message)  # a disconnect: vLLM sees it after the body
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False},
                                 *pending]

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        exchange = _Exchange(self, _parse_request(body), send)
        await self.app(scope, replayed, exchange.send)

    # -- the verdict

    def _get_client(self) -> AsyncDetectorClient:
        """One channel per event loop, made lazily inside it (grpc.aio binds to its loop)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            assert self.settings is not None
            self._client = AsyncDetectorClient(self.settings.grpc_address,
                                               tls=self.settings.tls_config(),
                                               timeout=self.settings.timeout_s)
            self._client_loop = loop
        return self._client

    async def verdict(self, response_id: str | None, texts: dict[int, str | None],
                      request: _Request) -> dict[str, Any]:
        """The ``lie_detector`` field; raises :class:`Unavailable`."""
        if self.settings is None:
            raise Unavailable("misconfigured", f"bad LIE_DETECTOR_ANNOTATE_* settings "
                                               f"({self.config_error})")
        if request.n != 1 or len(texts) > 1 or set(texts) - {0}:
            raise Unavailable("multiple-choices", "only responses with one choice are "
                                                  "annotated (n=1, one prompt)")
        text = texts.get(0)
        if text is None:
            raise Unavailable("no-text", "the choice has no text content")
        if not response_id:
            raise Unavailable("no-id", "the response has no id")
        bound = self.settings.timeout_s
        try:
            scores = await asyncio.wait_for(
                self._get_client().get_scores(response_id, wait_until_finished=True,
                                              timeout=bound),
                bound + _GRACE_S)
        except DetectorError as exc:
            raise Unavailable(f"sidecar-{exc.code.name.lower().replace('_', '-')}",
                              f"the sidecar answered {exc.code.name}") from None
        except asyncio.TimeoutError:
            raise Unavailable("sidecar-deadline-exceeded",
                              f"no answer from the sidecar within {bound:g} s") from None
        if not scores.state.done:
            raise Unavailable("not-finished",
                              f"scores not final within {bound:g} s "
                              f"(state {scores.state.name})")
        return annotation(scores, text)

    def note_unavailable(self, code: str) -> None:
        self.unavailable_total += 1
        if self._throttle.ready():
            logger.warning("lie-detector verdict unavailable (%s); %d responses without a "
                           "verdict so far", code, self.unavailable_total)


class _Exchange:
    """One annotated response on its way out: ``send`` is what vLLM calls."""

    def __init__(self, owner: LieDetectorMiddleware, request: _Request, send: Send) -> None:
        self.owner = owner
        self.request = request
        self.downstream = send
        self.mode = "pass"
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.stream = _StreamState()
        self.stream_ok = True
        self.carry = b""  # a streamed chunk's tail that may begin the [DONE] event
        self.held_done = b""

    async def send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            await self._start(message)
        elif kind == "http.response.body" and self.mode == "json":
            await self._json_body(message)
        elif kind == "http.response.body" and self.mode == "sse":
            await self._sse_body(message)
        else:
            await self.downstream(message)

    async def _start(self, message: Message) -> None:
        try:
            headers = list(message.get("headers") or ())
            status = message.get("status")
            content_type = b""
            for name, value in headers:
                if name.lower() == b"content-type":
                    content_type = value.lower()
            if not self.request.parsed:
                why = "request-not-json"
            elif status != 200:
                why = f"http-status-{status}"
            elif content_type.startswith(b"application/json"):
                self.mode, self.start = "json", message
                return  # held until the body is complete
            elif content_type.startswith(b"text/event-stream"):
                self.mode = "sse"
                why = ""
            else:
                why = "not-json"
            if why:
                self.owner.note_unavailable(why)
                message = {**message, "headers": headers + _verdict_headers(why)}
        except Exception:
            logger.exception("lie-detector middleware: response start passed through")
            self.mode = "pass"
        await self.downstream(message)

    # -- not streamed

    async def _json_body(self, message: Message) -> None:
        self.chunks.append(bytes(message.get("body", b"")))
        if message.get("more_body", False):
            return
        original = b"".join(self.chunks)
        assert self.start is not None
        start = self.start
        try:
            body, extra = await self._annotate_json(original)
            headers = [(k, v) for k, v in start.get("headers") or ()
                       if k.lower() != b"content-length"]
            headers += [(b"content-length", str(len(body)).encode())] + extra
            start = {**start, "headers": headers}
        except Exception:
            logger.exception("lie-detector middleware: response passed through unchanged")
            body = original
            start = {**start, "headers": list(start.get("headers") or ())
                     + _verdict_headers("internal-error")}
        await self.downstream(start)
        await self.downstream({**message, "body": body, "more_body": False})

    async def _annotate_json(self, original: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        try:
            try:
                data = json.loads(original)
            except (ValueError, UnicodeDecodeError):
                raise Unavailable("response-not-json", "vLLM's body is not JSON") from None
            end = original.rstrip().rfind(b"}")
            if not isinstance(data, dict) or end < 0 or FIELD in data:
                raise Unavailable("response-not-json", "vLLM's body is not a JSON object")
            choices = data.get("choices")
            if not isinstance(choices, list):
                raise Unavailable("no-choices", "the response has no choices")
            texts = {c.get("index", i) if isinstance(c, dict) else i: _choice_text(c)
                     for i, c in enumerate(choices)}
            response_id = data.get("id") if isinstance(data.get("id"), str) else None
            field_value = await self.owner.verdict(response_id, texts, self.request)
        except Unavailable as exc:
            self.owner.note_unavailable(exc.code)
            return original, _verdict_headers(exc.code)
        # Spliced in before the closing brace: vLLM's own bytes stay as they were.
        extra = json.dumps({FIELD: field_value}, ensure_ascii=False)[1:-1].encode()
        head = original[:end].rstrip()
        sep = b"," if not head.endswith(b"{") else b""
        return head + sep + extra + original[end:], [(VERDICT_HEADER, b"ok")]

    # -- streamed

    async def _sse_body(self, message: Message) -> None:
        more = bool(message.get("more_body", False))
        data = self.carry + bytes(message.get("body", b""))
        self.carry = b""
        forward = data
        try:
            if self.held_done:
                self.held_done += data  # nothing follows [DONE] in vLLM's streams
                forward = b""
            else:
                at = data.find(DONE)
                if at >= 0:
                    forward, self.held_done = data[:at], data[at:]
                elif more:
                    keep = _partial_suffix(data, DONE)
                    if keep:
                        forward, self.carry = data[:-keep], data[-keep:]
            if self.stream_ok:
                try:
                    self.stream.feed(forward)
                except Exception:
                    self.stream_ok = False
                    logger.exception("lie-detector middleware: stream not understood")
        except Exception:
            logger.exception("lie-detector middleware: stream passed through")
            forward, self.held_done, self.carry = data, b"", b""
            self.mode = "pass"
        if more:
            if forward:
                await self.downstream({**message, "body": forward})
            return
        tail = forward + self.carry
        try:
            event = await self._final_event()
        except Exception:
            logger.exception("lie-detector middleware: no final event")
            event = b""
        await self.downstream({**message, "body": tail + event + self.held_done,
                               "more_body": False})

    async def _final_event(self) -> bytes:
        try:
            if not self.stream_ok:
                raise Unavailable("internal-error", "the stream was not understood")
            if self.stream.error:
                raise Unavailable("stream-error", self.stream.error)
            texts: dict[int, str | None] = {i: "".join(p) for i, p in self.stream.texts.items()}
            value = await self.owner.verdict(self.stream.response_id, texts, self.request)
        except Unavailable as exc:
            self.owner.note_unavailable(exc.code)
            value = unavailable(exc.code, exc.detail)
        except Exception:
            logger.exception("lie-detector middleware: verdict failed")
            self.owner.note_unavailable("internal-error")
            value = unavailable("internal-error", "the middleware failed; vLLM's log says why")
        return b"data: " + json.dumps({FIELD: value}, ensure_ascii=False).encode() + b"\n\n"


def _verdict_headers(code: str) -> list[tuple[bytes, bytes]]:
    return [(VERDICT_HEADER, b"unavailable"), (REASON_HEADER, code.encode("ascii", "replace"))]


def _partial_suffix(data: bytes, marker: bytes) -> int:
    """The length of the longest tail of ``data`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:k]):
            return k
    return 0
