"""Verdicts in the client's own OpenAI response: an ASGI middleware for vLLM's API server.

    vllm serve MODEL --middleware detector.serving.openai_middleware.LieDetectorMiddleware

(``lie-detector serve`` adds it.) A request that carries ``X-Lie-Detector: annotate`` to
``/v1/completions`` or ``/v1/chat/completions`` gets the sidecar's verdict in its response:

* not streamed: one more top-level field, ``"lie_detector"``, spliced into vLLM's own JSON
  (every other byte as vLLM wrote it; Content-Length fixed) and the header
  ``X-Lie-Detector-Verdict: ok``;
* streamed: vLLM's events pass through as each is complete (the stream is read by SSE event
  boundaries, never by substring); the terminal ``data: [DONE]`` event is held back and
  preceded by one event ``data: {"lie_detector": {...}}``.

The verdict always describes the response it is attached to, whatever ids clients send:
vLLM builds the response id from ``X-Request-Id``, so two requests sent with one header
share it. The middleware therefore gives each annotated request an id of its own: vLLM sees
``X-Request-Id: {client's id}~ld{16 random hex}`` (the client's id is its header, else the
body's ``request_id``, else a fresh uuid) and the sidecar is asked by that id alone. The
tag is taken out of every byte the client gets back (the response id, an echoed
``X-Request-Id`` header), so the client sees the ids it would have seen without the
middleware; ``lie_detector.request_id`` keeps it, the one id that names this response alone
at the sidecar (``GetScores``). (A body ``request_id`` that is not printable latin-1 cannot
travel in a header: such a request gets a fresh uuid as its id.)

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
(:class:`detector.settings.AnnotateSettings`). Nothing here logs prompt or completion text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from detector.channel.ids import bounded
from detector.serving.client import AsyncDetectorClient, DetectorError, Scores, Span, TLSConfig
from detector.log_throttle import LogThrottle
from detector.settings import AnnotateSettings

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
REQUEST_ID_HEADER = b"x-request-id"
DONE = "[DONE]"
# One SSE event held while it is incomplete; past this the stream is passed through as it is.
MAX_EVENT_BYTES = 16 << 20
# Past the bound on the sidecar call (which the gRPC deadline enforces), a little for the
# reply to be decoded before the middleware stops waiting regardless.
_GRACE_S = 0.25


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
    # The body's ``request_id`` (vLLM's id for the request when no X-Request-Id is sent).
    request_id: str | None = None


def _parse_request(body: bytes) -> _Request:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _Request(parsed=False)
    if not isinstance(data, dict):
        return _Request(parsed=False)
    n = data.get("n")
    request_id = data.get("request_id")
    return _Request(n=n if isinstance(n, int) and not isinstance(n, bool) else 1,
                    request_id=request_id if isinstance(request_id, str) else None)


def _own_id(headers: Sequence[tuple[bytes, bytes]], request: _Request) -> tuple[bytes, bytes]:
    """(the X-Request-Id vLLM is to see, the tag in it): the client's id with a tag only this
    request has. The client's id is what vLLM would have used: its header, else the body's
    ``request_id``, else (as vLLM) a fresh uuid."""
    tag = b"~ld" + secrets.token_hex(8).encode()
    sent = [v for k, v in headers if k.lower() == REQUEST_ID_HEADER]
    if sent:
        base = bytes(sent[0])
    else:
        base = uuid.uuid4().hex.encode()
        rid = request.request_id
        if rid is not None and rid.isprintable():
            try:
                base = rid.encode("latin-1")
            except UnicodeEncodeError:
                pass
    return base + tag, tag


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


class SSEEvents:
    """Splits a byte stream into Server-Sent Events as the spec does: lines end with CRLF,
    LF or CR, and an empty line ends an event. :meth:`feed` returns each event complete
    (its bytes up to and including the empty line), in order, as soon as its end has
    arrived; nothing inside a line (a JSON string holding ``data: [DONE]``) can end one.
    The events' bytes put together are the stream's, byte for byte (an event ended by a CR
    whose LF comes in the next read is followed by that LF alone, as an empty "event")."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._event_start = 0  # where the event being read starts in the buffer
        self._line_start = 0
        self._scan = 0  # where to look for the next line end
        self._after_cr = False  # the last byte read was a CR: an LF next belongs to it

    @property
    def pending(self) -> int:
        """Bytes of an event not yet complete."""
        return len(self.buffer) - self._event_start

    def feed(self, data: bytes) -> list[bytes]:
        """The events that ``data`` completes."""
        buf = self.buffer
        buf += data
        events: list[bytes] = []
        i = self._scan
        while i < len(buf):
            if self._after_cr:
                self._after_cr = False
                if buf[i] == 0x0A:  # CRLF split between two reads: one line end
                    i += 1
                    if self._event_start == i - 1:  # the CR ended an event: the LF too
                        events.append(bytes(buf[i - 1:i]))
                        self._event_start = i
                    self._line_start = i
                    continue
            m = _LINE_END.search(buf, i)
            if m is None:
                i = len(buf)
                break
            j = m.start()
            end = j + 1
            if buf[j] == 0x0D:
                if end < len(buf):
                    end += buf[end] == 0x0A
                else:
                    self._after_cr = True
            if j == self._line_start:  # an empty line: the event is complete
                events.append(bytes(buf[self._event_start:end]))
                self._event_start = end
            self._line_start = i = end
        if self._event_start:
            del buf[:self._event_start]
            i -= self._event_start
            self._line_start -= self._event_start
            self._event_start = 0
        self._scan = i
        return events

    def rest(self) -> bytes:
        """What is left when the stream ended: an event never completed (or b"")."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        self._event_start = self._line_start = self._scan = 0
        self._after_cr = False
        return rest


_LINE_END = re.compile(rb"[\r\n]")
_LINE_SPLIT = re.compile(rb"\r\n|\r|\n")


def event_data(event: bytes) -> str | None:
    """The data of one SSE event (its ``data`` lines joined by newlines, as the spec says),
    or None when it has no ``data`` line (comments, other fields only)."""
    data: list[str] = []
    for line in _LINE_SPLIT.split(event):
        if not line or line.startswith(b":"):
            continue
        name, colon, value = line.partition(b":")
        if name != b"data":
            continue
        if colon and value.startswith(b" "):
            value = value[1:]
        data.append(value.decode("utf-8", "replace"))
    return "\n".join(data) if data else None


@dataclass
class _StreamState:
    """What the middleware reads of a streamed response as it passes by."""

    texts: dict[int, list[str]] = field(default_factory=dict)
    error: str | None = None

    def event(self, payload: str) -> None:
        """One event's data (not the terminal ``[DONE]``)."""
        try:
            data = json.loads(payload)
        except ValueError:
            self.error = "an event that is not JSON"
            return
        if not isinstance(data, dict):
            return
        if "error" in data:
            self.error = "vLLM sent an error event"
            return
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

        request = _parse_request(body)
        headers = list(scope.get("headers") or ())
        own_id, tag = _own_id(headers, request)
        scope = {**scope, "headers": [(k, v) for k, v in headers
                                      if k.lower() != REQUEST_ID_HEADER]
                 + [(REQUEST_ID_HEADER, own_id)]}
        # The id the hook sends for it (detector.channel.ids): vLLM reads headers as latin-1.
        exchange = _Exchange(self, request, send, tag=tag,
                             lookup_id=bounded(own_id.decode("latin-1")))
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

    async def verdict(self, lookup_id: str, texts: dict[int, str | None],
                      request: _Request) -> dict[str, Any]:
        """The ``lie_detector`` field of the response to the request vLLM knows by
        ``lookup_id`` (the id the middleware gave it); raises :class:`Unavailable`."""
        if self.settings is None:
            raise Unavailable("misconfigured", f"bad LIE_DETECTOR_ANNOTATE_* settings "
                                               f"({self.config_error})")
        if request.n != 1 or len(texts) > 1 or set(texts) - {0}:
            raise Unavailable("multiple-choices", "only responses with one choice are "
                                                  "annotated (n=1, one prompt)")
        text = texts.get(0)
        if text is None:
            raise Unavailable("no-text", "the choice has no text content")
        bound = self.settings.timeout_s
        try:
            scores = await asyncio.wait_for(
                self._get_client().get_scores(lookup_id, wait_until_finished=True,
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
    """One annotated response on its way out: ``send`` is what vLLM calls. ``tag`` is taken
    out of every byte the client gets; ``lookup_id`` is what the sidecar is asked by."""

    def __init__(self, owner: LieDetectorMiddleware, request: _Request, send: Send, *,
                 tag: bytes, lookup_id: str) -> None:
        self.owner = owner
        self.request = request
        self.downstream = send
        self.tag = tag
        self.lookup_id = lookup_id
        self.mode = "pass"
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.events = SSEEvents()
        self.stream = _StreamState()
        self.held: list[bytes] = []  # the terminal [DONE] event and anything after it

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

    def _untagged(self, data: bytes) -> bytes:
        return data.replace(self.tag, b"") if self.tag in data else data

    async def _start(self, message: Message) -> None:
        try:
            # vLLM's --enable-request-id-headers echoes the id it was given.
            headers = [(k, self._untagged(v) if k.lower() == REQUEST_ID_HEADER else v)
                       for k, v in message.get("headers") or ()]
            message = {**message, "headers": headers}
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
        original = self._untagged(b"".join(self.chunks))
        assert self.start is not None
        start = self.start
        try:
            body, extra = await self._annotate_json(original)
        except Exception:
            logger.exception("lie-detector middleware: response passed through unchanged")
            body, extra = original, _verdict_headers("internal-error")
        headers = [(k, v) for k, v in start.get("headers") or ()
                   if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(body)).encode())] + extra
        await self.downstream({**start, "headers": headers})
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
            field_value = await self.owner.verdict(self.lookup_id, texts, self.request)
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
        data = bytes(message.get("body", b""))
        try:
            forward = self._events(self.events.feed(data))
            too_long = more and self.events.pending > MAX_EVENT_BYTES
        except Exception:
            logger.exception("lie-detector middleware: stream not understood")
            forward, too_long = b"", True
        if too_long:  # passed on as it is from here: no final event
            self.owner.note_unavailable("stream-not-understood")
            self.mode = "pass"
            forward += b"".join(self.held) + self.events.rest()
            self.held = []
            await self.downstream({**message, "body": forward})
            return
        if more:
            if forward:
                await self.downstream({**message, "body": forward})
            return
        rest = self.events.rest()
        if rest:  # the stream ended inside an event: a final event would be spliced into it
            self.owner.note_unavailable("stream-error")
            event = b""
        else:
            try:
                event = await self._final_event()
            except Exception:
                logger.exception("lie-detector middleware: no final event")
                event = b""
        await self.downstream({**message, "body": forward + self._untagged(rest) + event
                               + b"".join(self.held), "more_body": False})

    def _events(self, events: list[bytes]) -> bytes:
        """The complete events to pass on now; the terminal ``[DONE]`` and whatever follows
        it are held for the end."""
        out = []
        for event in events:
            event = self._untagged(event)
            if self.held:
                self.held.append(event)
                continue
            data = event_data(event)
            if data == DONE:
                self.held.append(event)
                continue
            if data is not None:
                try:
                    self.stream.event(data)
                except Exception:  # e.g. JSON nested past the recursion limit
                    self.stream.error = "an event that could not be read"
            out.append(event)
        return b"".join(out)

    async def _final_event(self) -> bytes:
        try:
            if self.stream.error:
                raise Unavailable("stream-error", self.stream.error)
            texts: dict[int, str | None] = {i: "".join(p) for i, p in self.stream.texts.items()}
            value = await self.owner.verdict(self.lookup_id, texts, self.request)
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
