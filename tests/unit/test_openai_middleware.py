"""detector.serving.openai_middleware against a fake ASGI app and a fake sidecar client (no vLLM):
body rewriting, Content-Length, the held-back [DONE], pass-through and fail-open, each
request's own id, and SSE framing under any chunking (hypothesis, derandomized)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from detector.channel.ids import bounded
from detector.serving.client import DetectorError, RequestState, Scores, Span, Verdict
from detector.serving.openai_middleware import (
    AnnotateSettings,
    LieDetectorMiddleware,
    event_data,
    place_spans,
)

TEXT = " The capital of France is Paris."
SPAN = Span(char_start=26, char_end=31, token_start=6, token_end=7, text="Paris", kind="claim",
            probe="p", score=0.9, threshold=0.5, flagged=True)
SENTENCE = Span(char_start=0, char_end=len(TEXT), token_start=0, token_end=8, text=TEXT,
                kind="sentence", probe="p", score=0.9, threshold=0.5, flagged=True)
VERDICT = Verdict(probe="p", score=0.9, threshold=0.5, flagged=True, claims=1, flagged_claims=1)


def scores(text: str = TEXT, spans: tuple[Span, ...] = (SPAN, SENTENCE),
           state: RequestState = RequestState.FINISHED) -> Scores:
    return Scores(request_id="cmpl-1", engine_request_id="cmpl-1-0-abcd", state=state,
                  incomplete_reason="", num_prompt_tokens=5, probes=("p",), tokens=(),
                  spans=spans, text=text, verdicts=(VERDICT,), requests_with_id=1)


class FakeClient:
    def __init__(self, result: Scores | Exception) -> None:
        self.result = result
        self.asked: list[str] = []

    async def get_scores(self, request_id: str, *, wait_until_finished: bool = False,
                         timeout: float | None = None) -> Scores:
        self.asked.append(request_id)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def completion_body(text: str = TEXT, n: int = 1) -> bytes:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "model": "m",
                       "choices": [{"index": i, "text": text, "finish_reason": "stop"}
                                   for i in range(n)],
                       "usage": {"prompt_tokens": 5}}).encode()


def as_vllm(scope: dict, data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """``data`` with the response ids vLLM would build from the X-Request-Id it was sent
    (``cmpl-1`` / ``chatcmpl-1`` stand for the id), and the header
    ``--enable-request-id-headers`` adds."""
    sent = [v for k, v in scope["headers"] if k.lower() == b"x-request-id"]
    if not sent:
        return data, []
    x = sent[0].decode("latin-1")
    for kind in ("cmpl-", "chatcmpl-"):
        data = data.replace(f'"{kind}1"'.encode(),
                            json.dumps(f"{kind}{x}", ensure_ascii=False).encode())
    return data, [(b"x-request-id", sent[0])]


def json_app(body: bytes, *, status: int = 200, chunks: int = 1,
             content_type: bytes = b"application/json") -> Callable[..., Awaitable[None]]:
    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        nonlocal body
        request = await receive()
        assert request["type"] == "http.request"
        body, echoed = as_vllm(scope, body)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type),
                                (b"content-length", str(len(body)).encode()), *echoed]})
        size = -(-len(body) // chunks)
        for i in range(chunks):
            await send({"type": "http.response.body", "body": body[i * size:(i + 1) * size],
                        "more_body": i < chunks - 1})
    return app


def sse_app(events: list[bytes], split: int | None = None) -> Callable[..., Awaitable[None]]:
    """Streams ``events`` one per message, or the whole stream cut every ``split`` bytes."""
    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        await receive()
        tagged = [as_vllm(scope, e)[0] for e in events]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        stream = b"".join(tagged)
        parts = tagged if split is None else [stream[i:i + split]
                                               for i in range(0, len(stream), split)]
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return app


def sse_events(text: str = TEXT) -> list[bytes]:
    pieces = [text[:12], text[12:20], text[20:]]
    out = [b"data: " + json.dumps({"id": "cmpl-1", "choices": [
        {"index": 0, "text": p, "finish_reason": None}]}).encode() + b"\n\n" for p in pieces]
    return out + [b"data: [DONE]\n\n"]


# The client's X-Request-Id: the fakes' response ids (cmpl-1) are built from it.
ANNOTATED = [(b"x-lie-detector", b"annotate"), (b"x-request-id", b"1")]
# What the sidecar is asked by: the client's id with the middleware's tag.
OWN_ID = re.compile(r"1~ld[0-9a-f]{16}")


def asked_own_id(fake: FakeClient) -> bool:
    return len(fake.asked) == 1 and OWN_ID.fullmatch(fake.asked[0]) is not None


def run(middleware: LieDetectorMiddleware, *, headers: list[tuple[bytes, bytes]] | None = None,
        path: str = "/v1/completions", body: bytes = b'{"prompt": "x"}'
        ) -> tuple[dict, bytes, list[dict]]:
    sent: list[dict] = []
    incoming = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path,
                             "headers": headers if headers is not None else ANNOTATED}
    asyncio.run(middleware(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start, body_out, sent


def with_client(app: Callable[..., Awaitable[None]], result: Scores | Exception,
                **settings: Any) -> tuple[LieDetectorMiddleware, FakeClient]:
    mw = LieDetectorMiddleware(app, AnnotateSettings(**settings))
    fake = FakeClient(result)
    mw._get_client = lambda: fake  # type: ignore[method-assign,assignment,return-value]
    return mw, fake


def header(start: dict, name: bytes) -> bytes | None:
    return next((v for k, v in start["headers"] if k.lower() == name), None)


def test_json_body_gets_the_field_and_a_right_content_length() -> None:
    original = completion_body()
    mw, fake = with_client(json_app(original, chunks=3), scores())
    start, body, _ = run(mw)
    data = json.loads(body)
    assert asked_own_id(fake)
    assert header(start, b"x-request-id") == b"1"  # the client's, as vLLM echoes it
    assert header(start, b"content-length") == str(len(body)).encode()
    assert [k for k, _ in start["headers"]].count(b"content-length") == 1
    assert header(start, b"x-lie-detector-verdict") == b"ok"
    # vLLM's own bytes are kept: only the field is spliced in before the closing brace.
    assert body.startswith(original[:-1] + b",")
    field = data["lie_detector"]
    assert field["status"] == "ok" and field["state"] == "FINISHED"
    assert field["verdicts"] == [{"probe": "p", "score": 0.9, "threshold": 0.5, "flagged": True,
                                  "claims": 1, "flagged_claims": 1}]
    (span,) = field["spans"]  # claims only
    assert TEXT[span["char_start"]:span["char_end"]] == span["text"] == "Paris"


def test_chat_content_is_the_returned_text() -> None:
    body = json.dumps({"id": "chatcmpl-1", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Paris."}}]}).encode()
    mw, fake = with_client(json_app(body), scores(text=TEXT))
    start, out, _ = run(mw, path="/v1/chat/completions")
    (span,) = json.loads(out)["lie_detector"]["spans"]
    assert (span["char_start"], span["char_end"]) == (0, 5)
    assert json.loads(out)["id"] == "chatcmpl-1" and asked_own_id(fake)


def test_unannotated_requests_pass_straight_through() -> None:
    original = completion_body()
    mw, fake = with_client(json_app(original), scores())
    for kwargs in ({"headers": []}, {"headers": [(b"x-lie-detector", b"no")]},
                   {"path": "/v1/models"}):
        start, body, _ = run(mw, **kwargs)
        assert body == original and header(start, b"x-lie-detector-verdict") is None
    assert fake.asked == []


def test_disabled_by_setting() -> None:
    original = completion_body()
    mw, fake = with_client(json_app(original), scores(), disable=True)
    start, body, _ = run(mw)
    assert body == original and header(start, b"x-lie-detector-verdict") is None


@pytest.mark.parametrize("error,reason", [
    (DetectorError(grpc.StatusCode.UNAVAILABLE, "down"), b"sidecar-unavailable"),
    (DetectorError(grpc.StatusCode.NOT_FOUND, "unknown"), b"sidecar-not-found"),
    (RuntimeError("bug"), b"internal-error"),
])
def test_sidecar_failures_and_bugs_fail_open(error: Exception, reason: bytes) -> None:
    original = completion_body()
    mw, _ = with_client(json_app(original), error)
    start, body, _ = run(mw)
    assert start["status"] == 200 and body == original
    assert header(start, b"x-lie-detector-verdict") == b"unavailable"
    assert header(start, b"x-lie-detector-reason") == reason
    assert header(start, b"content-length") == str(len(original)).encode()


def test_not_finished_within_the_bound_is_unavailable() -> None:
    mw, _ = with_client(json_app(completion_body()), scores(state=RequestState.RUNNING))
    start, body, _ = run(mw)
    assert body == completion_body()
    assert header(start, b"x-lie-detector-reason") == b"not-finished"


def test_slow_sidecar_is_cut_at_the_bound() -> None:
    class Slow(FakeClient):
        async def get_scores(self, request_id: str, **_: Any) -> Scores:
            await asyncio.sleep(30)
            raise AssertionError("not reached")

    mw = LieDetectorMiddleware(json_app(completion_body()), AnnotateSettings(timeout_s=0.1))
    mw._get_client = lambda: Slow(scores())  # type: ignore[method-assign,assignment,return-value]
    start, body, _ = run(mw)
    assert body == completion_body()
    assert header(start, b"x-lie-detector-reason") == b"sidecar-deadline-exceeded"


@pytest.mark.parametrize("body,reason", [
    (b'{"id": "cmpl-1", "choices": [', b"response-not-json"),
    (b"[1, 2]", b"response-not-json"),
    (completion_body(n=2), b"multiple-choices"),
])
def test_odd_bodies_pass_through(body: bytes, reason: bytes) -> None:
    mw, fake = with_client(json_app(body), scores())
    start, out, _ = run(mw)
    assert out == body and header(start, b"x-lie-detector-reason") == reason


def test_errors_and_bad_requests_pass_through() -> None:
    error = b'{"error": {"message": "bad", "code": 400}}'
    mw, fake = with_client(json_app(error, status=400), scores())
    start, out, _ = run(mw)
    assert (start["status"], out) == (400, error)
    assert header(start, b"x-lie-detector-reason") == b"http-status-400"
    start, out, _ = run(mw, body=b"not json")
    assert out == error and header(start, b"x-lie-detector-reason") == b"request-not-json"
    assert fake.asked == []


@pytest.mark.parametrize("split", [None, 1, 7])
def test_stream_gets_a_final_event_before_done(split: int | None) -> None:
    events = sse_events()
    mw, fake = with_client(sse_app(events, split), scores())
    start, out, sent = run(mw)
    assert header(start, b"x-lie-detector-verdict") is None  # headers left before the verdict
    original = b"".join(events)
    head, done = original[:-len(b"data: [DONE]\n\n")], b"data: [DONE]\n\n"
    assert out.startswith(head) and out.endswith(done)
    final = out[len(head):-len(done)]
    assert final.startswith(b"data: ") and final.endswith(b"\n\n")
    field = json.loads(final[6:])["lie_detector"]
    assert field["status"] == "ok" and field["spans"][0]["text"] == "Paris"
    assert asked_own_id(fake)
    if split is None:  # each event went on as it came, not after the stream
        bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
        assert bodies[:3] == events[:3]


def test_stream_fail_open_says_so_in_the_final_event() -> None:
    events = sse_events()
    mw, _ = with_client(sse_app(events), DetectorError(grpc.StatusCode.UNAVAILABLE, "down"))
    _, out, _ = run(mw)
    final = out.split(b"\n\n")[-3]
    field = json.loads(final[6:])["lie_detector"]
    assert field["status"] == "unavailable" and field["reason"] == "sidecar-unavailable"
    assert out.endswith(b"data: [DONE]\n\n")


def test_unannotated_stream_is_untouched() -> None:
    events = sse_events()
    mw, fake = with_client(sse_app(events), scores())
    _, out, _ = run(mw, headers=[])
    assert out == b"".join(events) and fake.asked == []


def test_a_dead_sidecar_fails_open_through_grpc() -> None:
    """The real grpc.aio client against a port nobody listens on, under uvloop as vLLM runs."""
    uvloop = pytest.importorskip("uvloop")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mw = LieDetectorMiddleware(json_app(completion_body()),
                               AnnotateSettings(grpc_address=f"127.0.0.1:{port}", timeout_s=1.0))
    uvloop.install()
    try:
        start, body, _ = run(mw)
        # A second request reuses the channel made on the first (a new loop: a new channel).
        start2, _, _ = run(mw)
    finally:
        asyncio.set_event_loop_policy(None)
    assert body == completion_body()
    assert header(start, b"x-lie-detector-reason") == b"sidecar-unavailable"
    assert header(start2, b"x-lie-detector-reason") == b"sidecar-unavailable"


def test_bad_settings_fail_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIE_DETECTOR_ANNOTATE_TIMEOUT_S", "-1")
    mw = LieDetectorMiddleware(json_app(completion_body()))
    start, body, _ = run(mw)
    assert body == completion_body()
    assert header(start, b"x-lie-detector-reason") == b"misconfigured"


def test_spans_re_placed_where_texts_differ() -> None:
    claim = SPAN
    # Equal texts: offsets kept.
    assert place_spans([claim], TEXT, TEXT) == ([claim], 0)
    # Spacing differs before the span: found by its text nearby.
    returned = "The capital of  France is Paris."
    (placed,), dropped = place_spans([claim], TEXT, returned)
    assert returned[placed.char_start:placed.char_end] == "Paris" and dropped == 0
    # Echo: the prompt comes first.
    returned = "Q: capital?" + TEXT
    (placed,), _ = place_spans([claim], TEXT, returned)
    assert returned[placed.char_start:placed.char_end] == "Paris"
    # A stop string cut the span away: dropped and counted.
    assert place_spans([claim], TEXT, " The capital of France is") == ([], 1)
    # The nearest of several occurrences.
    text = "Paris, Paris, Paris"
    mid = Span(**{**claim.__dict__, "char_start": 7, "char_end": 12})
    (placed,), _ = place_spans([mid], text, " " + text)
    assert placed.char_start == 8


def test_serve_loads_the_middleware_and_tells_it_the_sidecar(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from detector.serving.serve import MIDDLEWARE, ServeOptions, engine_env, vllm_command

    opts = ServeOptions(model_dir=tmp_path, grpc_address="0.0.0.0:50999")
    cmd = vllm_command(opts)
    assert cmd[cmd.index("--middleware") + 1] == MIDDLEWARE
    assert engine_env(opts, [4])["LIE_DETECTOR_ANNOTATE_GRPC_ADDRESS"] == "127.0.0.1:50999"
    module, name = MIDDLEWARE.rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[name]), name) is LieDetectorMiddleware
    monkeypatch.delenv("LIE_DETECTOR_ANNOTATE_GRPC_ADDRESS", raising=False)
    off = ServeOptions(model_dir=tmp_path, annotate=False)  # lie-detector serve --no-annotate
    assert "--middleware" not in vllm_command(off)
    assert "LIE_DETECTOR_ANNOTATE_GRPC_ADDRESS" not in engine_env(off, [4])


# ---- each annotated request has an id of its own (issue 23, finding 2) ------------------------

def _seen_ids(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[list[bytes], dict,
                                                                      FakeClient]:
    """The X-Request-Id headers vLLM is given for one annotated request, the client's
    response and what the sidecar was asked by."""
    seen: list[bytes] = []
    inner = json_app(completion_body())

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        seen.extend(v for k, v in scope["headers"] if k.lower() == b"x-request-id")
        await inner(scope, receive, send)

    mw, fake = with_client(app, scores())
    start, out, _ = run(mw, headers=headers, body=body)
    return seen, {"start": start, "body": json.loads(out)}, fake


def test_requests_sharing_an_x_request_id_are_told_apart() -> None:
    """vLLM builds the response id from X-Request-Id: two requests sent with one header would
    share it, and each could be given the other's verdict. vLLM sees an id of each one's own;
    the client gets back the ids it would have got without the middleware."""
    shared = [(b"x-lie-detector", b"annotate"), (b"x-request-id", b"same")]
    first, second = (_seen_ids(shared, b'{"prompt": "x"}') for _ in range(2))
    (a,), (b,) = first[0], second[0]
    assert a != b and a.startswith(b"same~ld") and b.startswith(b"same~ld")
    for seen, reply, fake in (first, second):
        assert fake.asked == [seen[0].decode()]  # asked by that id alone
        assert reply["body"]["id"] == "cmpl-same"  # as vLLM makes it from the client's id
        assert header(reply["start"], b"x-request-id") == b"same"
        assert reply["body"]["lie_detector"]["status"] == "ok"


@pytest.mark.parametrize("headers,body,client_id", [
    # No X-Request-Id: vLLM takes the body's request_id, else a fresh uuid.
    ([], b'{"prompt": "x", "request_id": "from-body"}', "from-body"),
    ([], b'{"prompt": "x"}', None),
    # Not printable latin-1: it cannot be a header; the request gets a fresh uuid.
    ([], '{"prompt": "x", "request_id": "\u20ac\\n"}'.encode(), None),
    # Sent twice: vLLM reads the first.
    ([(b"x-request-id", b"one"), (b"x-request-id", b"two")], b'{"prompt": "x"}', "one"),
    # Empty, long, and non-ASCII (UTF-8 bytes, read as latin-1 by vLLM).
    ([(b"x-request-id", b"")], b'{"prompt": "x"}', ""),
    ([(b"x-request-id", b"L" * 70000)], b'{"prompt": "x"}', "L" * 70000),
    ([(b"x-request-id", "r\u00e9q\u20ac".encode())], b'{"prompt": "x"}',
     "r\u00e9q\u20ac".encode().decode("latin-1")),
])
def test_the_client_sees_its_own_ids(headers, body: bytes, client_id: str | None) -> None:
    seen, reply, fake = _seen_ids([(b"x-lie-detector", b"annotate"), *headers], body)
    (own,) = seen
    base = own.decode("latin-1")[:-len("~ld0123456789abcdef")]
    if client_id is None:
        assert re.fullmatch(r"[0-9a-f]{32}", base)
    else:
        assert base == client_id
    assert reply["body"]["id"] == f"cmpl-{base}"
    assert header(reply["start"], b"x-request-id") == base.encode("latin-1")
    # Asked by the form the hook sends: bounded, printable ASCII.
    (asked,) = fake.asked
    assert asked == bounded(own.decode("latin-1")) and len(asked) <= 200 and asked.isascii()


# ---- SSE framing (issue 23, finding 3) -------------------------------------------------------

def completion_event(piece: str, eol: bytes = b"\n") -> bytes:
    return (b"data: " + json.dumps({"id": "cmpl-1", "choices": [
        {"index": 0, "text": piece, "finish_reason": None}]}).encode() + eol + eol)


def test_sse_syntax_inside_a_payload_is_not_an_event_boundary() -> None:
    """An echoed prompt holding ``data: [DONE]`` and blank lines: the middleware used to
    find the marker inside the first event's JSON string, splice its event into it and hold
    the rest of the stream back."""
    pieces = ["Q: say data: [DONE]\n\ndata: [DONE]\r\n: x\n\n", " The capital", " is Paris."]
    events = [completion_event(p) for p in pieces] + [b"data: [DONE]\n\n"]
    mw, _ = with_client(sse_app(events), scores(text="".join(pieces)))
    _, out, sent = run(mw)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies[:3] == events[:3]  # each event went on as it came, whole
    parsed = [json.loads(e.removeprefix(b"data: ")) for e in out.split(b"\n\n")[:-2]]
    assert [p["choices"][0]["text"] for p in parsed[:3]] == pieces
    assert parsed[3]["lie_detector"]["status"] == "ok"
    assert out.endswith(b"\n\ndata: [DONE]\n\n")


def _framing_case(pieces: list[str], eols: list[bytes], comments: list[bool],
                  cuts: list[int] | int) -> None:
    """One stream through the middleware, cut at ``cuts`` (or every ``cuts`` bytes, an int):
    the client gets vLLM's bytes with
    the final event just before ``[DONE]``, and after each piece vLLM sent, every event that
    piece completed (the terminal one apart) and nothing more."""
    events = []
    for piece, eol, comment in zip(pieces, eols, comments):
        event = completion_event(piece, eol)
        events.append(b": data: [DONE]" + eol + event if comment else event)
        if comment:  # and a comment-only event
            events.append(b":" + piece.encode() .replace(b"\n", b" ").replace(b"\r", b" ")
                          + eol + eol)
    done = b"data: [DONE]" + eols[-1] + eols[-1]
    expected_text = "".join(pieces)
    progress: list[tuple[int, int]] = []  # (bytes vLLM sent, bytes the client got)
    got = bytearray()

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        await receive()
        tagged = [as_vllm(scope, e)[0] for e in [*events, done]]
        stream = b"".join(tagged)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        at = range(0, len(stream), cuts) if isinstance(cuts, int) else cuts
        edges = sorted({c % (len(stream) + 1) for c in at} | {0, len(stream)})
        for lo, hi in zip(edges, edges[1:]):
            await send({"type": "http.response.body", "body": stream[lo:hi], "more_body": True})
            # An event ending in CRLF is complete at its CR: the LF may come later.
            ends = [sum(len(t) for t in tagged[:k + 1]) - tagged[k].endswith(b"\r\n")
                    for k in range(len(events))]
            complete = sum(1 for end in ends if end <= hi)
            lf_due = complete > 0 and ends[complete - 1] == hi and \
                tagged[complete - 1].endswith(b"\r\n")
            progress.append((complete, len(got) + lf_due))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def downstream(message: dict) -> None:
        got.extend(message.get("body", b""))

    mw, _ = with_client(app, scores(text=expected_text))
    texts: list[dict] = []
    verdict = mw.verdict

    async def spy(lookup_id: str, seen: dict, request: Any) -> dict:
        texts.append(seen)
        return await verdict(lookup_id, seen, request)

    mw.verdict = spy  # type: ignore[method-assign]
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": ANNOTATED}
    incoming = [{"type": "http.request", "body": b'{"prompt": "x"}', "more_body": False}]

    async def receive() -> dict:
        return incoming.pop(0)

    asyncio.run(mw(scope, receive, downstream))
    head = b"".join(events)
    assert bytes(got[:len(head)]) == head and bytes(got).endswith(done)
    final = event_data(bytes(got[len(head):-len(done)]))
    assert final is not None and json.loads(final)["lie_detector"]["status"] == "ok"
    assert texts == [{0: expected_text}]
    for complete, forwarded in progress:
        assert forwarded == len(b"".join(events[:complete]))


_SSE_BITS = st.sampled_from(["data: [DONE]", "data:", "\n\n", "\r\n", "\r", "\n", ":", " ",
                             "}", '"', "\\", "\u00e9", "\u20ac", "Paris", "event: x", "id: 1"])
_EOLS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@settings(derandomize=True, max_examples=150, deadline=None)
@given(data=st.data())
def test_sse_framing_under_any_chunking(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 5))
    pieces = data.draw(st.lists(st.lists(_SSE_BITS, max_size=6).map("".join),
                                min_size=n, max_size=n))
    eols = data.draw(st.lists(_EOLS, min_size=n, max_size=n))
    comments = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    cuts = data.draw(st.lists(st.integers(0, 4000), max_size=12))
    _framing_case(pieces, eols, comments, cuts)


def test_sse_framing_at_every_chunk_size() -> None:
    """Every fixed chunk size through the whole stream (1 byte up to all of it at once)."""
    pieces = ["data: [DONE]\n\n", "a\r\nb\rc", ": x"]
    eols = [b"\r\n", b"\r", b"\n"]
    for size in range(1, 700):  # the stream is about 500 bytes
        _framing_case(pieces, eols, [True, False, True], size)
