"""Verdicts in the client's own OpenAI response (detector.serving.openai_middleware) through a real
vLLM server started with ``--middleware`` and a real sidecar serving the shipped probe.

One vLLM server for the module; the plugin-off baseline is the session's shared
``vllm_server_disabled``. The sidecar is killed by the last test (fail-open), so the
order of the tests matters: that one stays last."""

from __future__ import annotations

import contextlib
import io
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from readme_examples import example, shell_commands
from support import (
    SidecarProcess,
    VllmServer,
    _served_model,
    start_sidecar,
    start_vllm,
    wait_for_engine,
    wait_until,
)

from detector.artifact import default_probe_dir, load_probe, probe_token_features
from detector.serving.client import DetectorClient, Scores
from detector.serving.openai_middleware import place_spans

pytestmark = pytest.mark.vllm

# Generous on a shared 2-core machine: the bound only matters when the sidecar is slow.
BOUND_S = 10.0
ANNOTATE = {"X-Lie-Detector": "annotate"}
QUESTION = "What is the capital of France?"
PROMPT = f"Q: {QUESTION}\nA:"
MAX_TOKENS = 12


@dataclass
class Served:
    server: VllmServer
    sidecar: SidecarProcess


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory) -> Served:
    probe = default_probe_dir()
    if probe is None:
        pytest.skip("the shipped probe is not built")
    workdir = tmp_path_factory.mktemp("annotate")
    # start_vllm's channel: the sidecar binds it first, so vLLM is told its gRPC address.
    channel = f"ipc://{workdir}/channel/channel.sock"
    sidecar = start_sidecar(channel, workdir / "sidecar", probes=[probe], model_dir=model_dir)
    # The engine captures what the shipped probe reads and computes the token features its
    # verdict reads, as `lie-detector serve` would.
    meta = load_probe(probe).metadata
    try:
        server = start_vllm(model_dir, workdir, layers=meta.layers, annotate=True, env_extra={
            "LIE_DETECTOR_TOKEN_FEATURES": ",".join(probe_token_features([meta])),
            "LIE_DETECTOR_ANNOTATE_GRPC_ADDRESS": sidecar.grpc_address,
            "LIE_DETECTOR_ANNOTATE_TIMEOUT_S": str(BOUND_S)})
    except Exception:
        sidecar.stop()
        raise
    try:
        wait_for_engine(sidecar.grpc_address)
        yield Served(server, sidecar)
    finally:
        server.stop()
        sidecar.stop()


def body_for(base_url: str, api: str, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": _served_model(base_url), "max_tokens": MAX_TOKENS,
                            "temperature": 0.0, "stream": stream}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": QUESTION}]
    else:
        body["prompt"] = PROMPT
    return body


def path_for(api: str) -> str:
    return "/v1/chat/completions" if api == "chat" else "/v1/completions"


def post(base_url: str, api: str, *, stream: bool = False,
         headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(base_url + path_for(api), json=body_for(base_url, api, stream=stream),
                      headers=headers or {}, timeout=300)


def returned_text(api: str, choice: dict) -> str:
    return choice["message"]["content"] if api == "chat" else choice["text"]


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-200:]
    return [e for e in raw.split(b"\n\n") if e]


def streamed_text(api: str, events: list[dict]) -> str:
    out = []
    for event in events:
        for choice in event.get("choices") or ():
            piece = choice.get("text") if api == "completions" else (
                choice.get("delta") or {}).get("content")
            out.append(piece or "")
    return "".join(out)


def check_field(field: dict, response_id: str, text: str, sidecar: SidecarProcess) -> None:
    """The field is what the sidecar says of that response, offsets into ``text``."""
    assert field["status"] == "ok", field
    assert field["state"] == "FINISHED"
    with DetectorClient(sidecar.grpc_address) as client:
        scores = client.get_scores(response_id)
    assert field["verdicts"] == [
        {"probe": v.probe, "score": v.score, "threshold": v.threshold, "flagged": v.flagged,
         "claims": v.claims, "flagged_claims": v.flagged_claims} for v in scores.verdicts]
    assert field["verdicts"] and field["verdicts"][0]["claims"] >= 1, field
    placed, dropped = place_spans(scores.claims, scores.text, text)
    assert field["spans_dropped"] == dropped
    assert [(s["char_start"], s["char_end"], s["text"], s["probe"], s["score"], s["flagged"])
            for s in field["spans"]] == [
        (s.char_start, s.char_end, s.text, s.probe, s.score, s.flagged) for s in placed]
    assert field["spans"], "a short factual answer has claim spans"
    for span in field["spans"]:
        assert text[span["char_start"]:span["char_end"]] == span["text"]
    if scores.text == text:  # the usual case: the sidecar's offsets as they were
        assert field["spans_dropped"] == 0
        assert [(s["char_start"], s["char_end"]) for s in field["spans"]] == [
            (s.char_start, s.char_end) for s in scores.claims]


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_annotated_response_carries_the_verdict(served: Served, api: str) -> None:
    resp = post(served.server.base_url, api, headers=ANNOTATE)
    assert resp.status_code == 200
    assert resp.headers["x-lie-detector-verdict"] == "ok"
    assert int(resp.headers["content-length"]) == len(resp.content)
    data = resp.json()
    text = returned_text(api, data["choices"][0])
    check_field(data["lie_detector"], data["id"], text, served.sidecar)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_annotated_stream_ends_with_the_verdict(served: Served, api: str) -> None:
    resp = post(served.server.base_url, api, stream=True, headers=ANNOTATE)
    assert resp.status_code == 200
    events = sse_events(resp.content)
    assert events[-1] == b"data: [DONE]"
    final = json.loads(events[-2].removeprefix(b"data: "))
    assert list(final) == ["lie_detector"]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    check_field(final["lie_detector"], chunks[0]["id"], streamed_text(api, chunks),
                served.sidecar)


# vLLM gives every response a fresh random id and the time it was made: the only bytes that
# may differ between two servers answering the same greedy request. Everything else (text,
# token counts, key order, spacing) must be byte for byte what the plugin-off server sends.
_ID = re.compile(rb'"id":\s*"[^"]*"')
_CREATED = re.compile(rb'"created":\s*\d+')


def normalised(raw: bytes) -> bytes:
    return _CREATED.sub(b'"created":0', _ID.sub(b'"id":"X"', raw))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_unannotated_requests_are_byte_identical(served: Served, vllm_server_disabled,
                                                 api: str, stream: bool) -> None:
    ours = post(served.server.base_url, api, stream=stream)
    base = post(vllm_server_disabled.base_url, api, stream=stream)
    assert ours.status_code == base.status_code == 200
    assert "x-lie-detector-verdict" not in ours.headers
    assert b"lie_detector" not in ours.content
    assert normalised(ours.content) == normalised(base.content)
    assert ours.headers.get("content-type") == base.headers.get("content-type")


@pytest.mark.parametrize("extra", [
    # The returned text starts with the prompt: offsets count it too.
    {"echo": True},
    # vLLM cuts at the stop string in its API process, after the engine ran past it.
    {"stop": ["\n", "."]},
])
def test_offsets_index_the_returned_text(served: Served, extra: dict) -> None:
    body = {**body_for(served.server.base_url, "completions"), **extra}
    resp = httpx.post(served.server.base_url + "/v1/completions", json=body, headers=ANNOTATE,
                      timeout=300)
    assert resp.status_code == 200 and resp.headers["x-lie-detector-verdict"] == "ok"
    data = resp.json()
    text = data["choices"][0]["text"]
    if "echo" in extra:
        assert text.startswith(PROMPT)
    field = data["lie_detector"]
    for span in field["spans"]:
        assert text[span["char_start"]:span["char_end"]] == span["text"]
    with DetectorClient(served.sidecar.grpc_address) as client:
        scores = client.get_scores(data["id"])
    # Every claim of the sidecar's text is placed, none dropped, none invented.
    assert field["spans_dropped"] == 0
    assert [s["text"] for s in field["spans"]] == [s.text for s in scores.claims]


def test_other_endpoints_and_bad_requests_unchanged(served: Served) -> None:
    resp = httpx.get(served.server.base_url + "/v1/models", headers=ANNOTATE, timeout=30)
    assert resp.status_code == 200 and "x-lie-detector-verdict" not in resp.headers
    bad = httpx.post(served.server.base_url + "/v1/completions", headers=ANNOTATE,
                     json={"model": _served_model(served.server.base_url)}, timeout=30)
    assert bad.status_code == 400 and "lie_detector" not in bad.text
    assert bad.headers["x-lie-detector-verdict"] == "unavailable"


def test_two_choices_say_unavailable(served: Served) -> None:
    body = {**body_for(served.server.base_url, "completions"), "n": 2, "temperature": 0.8,
            "seed": 1}
    resp = httpx.post(served.server.base_url + "/v1/completions", json=body, headers=ANNOTATE,
                      timeout=300)
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 2
    assert resp.headers["x-lie-detector-verdict"] == "unavailable"
    assert resp.headers["x-lie-detector-reason"] == "multiple-choices"


# ---- issue 23: hostile ids and framing ---------------------------------------------------------

def own_scores(field: dict, text: str, sidecar: SidecarProcess, *, echo: str = "") -> Scores:
    """The sidecar's scores of the request the annotation names (its ``request_id`` is that
    request's own id), checked to be this response's: the same text (after the ``echo``ed
    prompt), the same verdicts, and the spans placed in it as the field has them."""
    assert field["status"] == "ok", field
    with DetectorClient(sidecar.grpc_address) as client:
        scores = client.get_scores(field["request_id"])
    assert scores.requests_with_id == 1
    assert echo + scores.text == text, (scores.text, text)
    assert field["state"] == scores.state.name == "FINISHED", field
    assert field["verdicts"] == [
        {"probe": v.probe, "score": v.score, "threshold": v.threshold, "flagged": v.flagged,
         "claims": v.claims, "flagged_claims": v.flagged_claims} for v in scores.verdicts]
    placed, dropped = place_spans(scores.claims, scores.text, text)
    assert field["spans_dropped"] == dropped == 0
    assert [(s["char_start"], s["char_end"], s["text"], s["score"]) for s in field["spans"]] \
        == [(s.char_start, s.char_end, s.text, s.score) for s in placed]
    for span in field["spans"]:
        assert text[span["char_start"]:span["char_end"]] == span["text"]
    return scores


def every_token_scored(scores: Scores) -> bool:
    """Every token that has a row: the shipped probe reads each token's own row, and vLLM
    never computes the last token's."""
    return all(t.scored and t.scores for t in scores.tokens[:-1])


def _post(base_url: str, path: str, body: dict, headers: dict) -> httpx.Response:
    return httpx.post(base_url + path, json=body, headers=headers, timeout=300)


def _id_of(n: int) -> bytes:
    """An id of exactly ``n`` bytes, unique to this run."""
    return (uuid.uuid4().hex * (n // 32 + 1)).encode()[:n]


def test_hostile_ids_cost_only_their_own_request(served: Served) -> None:
    """Issue 23: a 600-character X-Request-Id got every engine step holding it refused, so
    the annotated requests sharing those steps came back INCOMPLETE. Ids of 0, 1, 513, 600
    and 65,536 bytes and non-ASCII ones (header and body), annotated or not, beside four
    normal annotated requests: the normal ones finish with every token scored, and every
    hostile one vLLM accepts is found by its own id, finished and scored too."""
    base = served.server.base_url
    model = _served_model(base)
    hostile: list[tuple[bytes | None, dict, bool]] = [
        (x, {}, False) for x in (b"", b"q", _id_of(513), _id_of(600), _id_of(65536),
                                 "r\u00e9q\u00eate-\u20ac-\u2713".encode())]
    hostile += [(None, {"request_id": "\u20ac-body-" + uuid.uuid4().hex}, False),
                (_id_of(600), {}, True), (_id_of(65536), {}, True)]
    normal_ids = [f"normal-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]

    def body(extra: dict, max_tokens: int) -> dict:
        return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, **extra}

    with ThreadPoolExecutor(len(normal_ids) + len(hostile)) as pool:
        normal = [pool.submit(_post, base, "/v1/completions", body({}, 24),
                              {**ANNOTATE, "X-Request-Id": x}) for x in normal_ids]
        odd = [pool.submit(_post, base, "/v1/completions", body(extra, 16),
                           {**(ANNOTATE if annotated else {}),
                            **({} if x is None else {"X-Request-Id": x})})
               for x, extra, annotated in hostile]
        normal_replies = [f.result() for f in normal]
        odd_replies = [f.result() for f in odd]
    for resp in normal_replies:
        assert resp.status_code == 200 and resp.headers["x-lie-detector-verdict"] == "ok"
        data = resp.json()
        scores = own_scores(data["lie_detector"], data["choices"][0]["text"], served.sidecar)
        assert not scores.incomplete_reason
        assert len(scores.tokens) == data["usage"]["completion_tokens"] == 24
        assert every_token_scored(scores)
    with DetectorClient(served.sidecar.grpc_address) as client:
        for (x, extra, annotated), resp in zip(hostile, odd_replies):
            if resp.status_code != 200:  # vLLM may refuse some: then only the above matters
                assert 400 <= resp.status_code < 500, resp.status_code
                continue
            data = resp.json()
            asked = x.decode() if x else extra.get("request_id")
            if annotated:
                assert resp.headers["x-lie-detector-verdict"] == "ok"
                assert data["id"] == f"cmpl-{asked}"  # the client's id, as vLLM makes it
                own_scores(data["lie_detector"], data["choices"][0]["text"], served.sidecar)
            if not asked or annotated:
                continue
            scores = client.get_scores(f"cmpl-{asked}")
            assert scores.state.name == "FINISHED" and not scores.incomplete_reason
            assert len(scores.tokens) == data["usage"]["completion_tokens"] == 16
            assert every_token_scored(scores)


def _read(api: str, resp: httpx.Response, stream: bool) -> tuple[str, str, dict]:
    """(response id, returned text, lie_detector field) of one annotated response."""
    assert resp.status_code == 200
    if not stream:
        assert resp.headers["x-lie-detector-verdict"] == "ok"
        data = resp.json()
        return data["id"], returned_text(api, data["choices"][0]), data["lie_detector"]
    events = sse_events(resp.content)
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    final = json.loads(events[-2].removeprefix(b"data: "))
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    return chunks[0]["id"], streamed_text(api, chunks), final["lie_detector"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_requests_sharing_an_id_each_get_their_own_verdict(served: Served, api: str,
                                                           stream: bool) -> None:
    """Issue 23: vLLM builds the response id from X-Request-Id, so A (48 tokens) and B (8
    tokens) sent with one header shared it, and A's response carried B's verdict (18 of 18
    tries). Each annotation now describes its own response: its spans index that text and
    equal that request's own scores; the client still sees the response id vLLM makes from
    its header."""
    base = served.server.base_url
    shared = f"shared-{uuid.uuid4().hex[:8]}"
    headers = {**ANNOTATE, "X-Request-Id": shared}
    bodies = []
    for question, max_tokens in (("Who wrote Hamlet?", 48), (QUESTION, 8)):
        body = {**body_for(base, api, stream=stream), "max_tokens": max_tokens,
                "ignore_eos": True}
        if api == "chat":
            body["messages"] = [{"role": "user", "content": question}]
        else:
            body["prompt"] = f"Q: {question}\nA:"
        bodies.append(body)
    with ThreadPoolExecutor(2) as pool, DetectorClient(served.sidecar.grpc_address) as client:
        first = pool.submit(_post, base, path_for(api), bodies[0], headers)

        def running() -> bool:  # A is generating: B goes in while it runs
            try:
                return bool(client.get_scores(shared).tokens)
            except Exception:
                return False
        wait_until(running, 120, 0.05, "the first request to run")
        second = pool.submit(_post, base, path_for(api), bodies[1], headers)
        replies = [first.result(), second.result()]
    kind = "chatcmpl" if api == "chat" else "cmpl"
    seen = []
    for resp, max_tokens in zip(replies, (48, 8)):
        response_id, text, field = _read(api, resp, stream)
        assert response_id == f"{kind}-{shared}"
        scores = own_scores(field, text, served.sidecar)
        assert len(scores.tokens) == max_tokens
        seen.append(field["request_id"])
    assert seen[0] != seen[1]


def test_sse_syntax_in_an_echoed_prompt_keeps_the_stream_whole(served: Served) -> None:
    """Issue 23: an echoed prompt holding ``data: [DONE]`` made the middleware splice its
    final event into the first event's JSON string and hold the rest of the stream back.
    Every event parses, the verdict comes just before the real [DONE], and it describes
    the text the client got."""
    prompt = 'Say "data: [DONE]"\n\ndata: [DONE]\r\n: ping\r\rid: 7\n\nQ: ' + QUESTION + "\nA:"
    body = {**body_for(served.server.base_url, "completions", stream=True), "prompt": prompt,
            "echo": True}
    resp = httpx.post(served.server.base_url + "/v1/completions", json=body, headers=ANNOTATE,
                      timeout=300)
    _, text, field = _read("completions", resp, stream=True)
    assert text.startswith(prompt) and len(text) > len(prompt)
    own_scores(field, text, served.sidecar, echo=prompt)


def test_readme_openai_examples_run(served: Served) -> None:
    """The README's curl and Python examples, as written, against this module's server: only
    the address changes (``localhost:8000``); the model is named as the README names it."""
    base = served.server.base_url
    ((program, *argv),) = shell_commands(example("openai-curl"))
    assert program == "curl"
    (url,) = [a for a in argv if a.startswith("localhost:8000/")]
    given = [argv[i + 1] for i, a in enumerate(argv) if a == "-H"]
    headers = dict(h.split(": ", 1) for h in given)
    resp = httpx.post(base + url.removeprefix("localhost:8000"), headers=headers,
                      content=argv[argv.index("-d") + 1], timeout=120)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert resp.headers["x-lie-detector-verdict"] == "ok"
    check_field(data["lie_detector"], data["id"], data["choices"][0]["message"]["content"],
                served.sidecar)

    source = example("openai-python")
    assert '"http://localhost:8000/v1"' in source
    out = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(out):
        exec(compile(source.replace('"http://localhost:8000/v1"', repr(base + "/v1")),
                     "README.md", "exec"), namespace)
    verdict = namespace["verdict"]
    assert verdict["status"] == "ok" and verdict["state"] == "FINISHED"
    spans = [(s["text"], s["flagged"]) for s in verdict["spans"]]
    assert out.getvalue() == f"ok {'flagged' if verdict['flagged'] else 'ok'} {spans}\n"


# Last: the sidecar does not come back.
def test_sidecar_gone_fails_open(served: Served, vllm_server_disabled) -> None:
    served.sidecar.kill()
    for api in ("completions", "chat"):
        resp = post(served.server.base_url, api, headers=ANNOTATE)
        assert resp.status_code == 200
        assert resp.headers["x-lie-detector-verdict"] == "unavailable"
        assert resp.headers["x-lie-detector-reason"].startswith("sidecar-")
        assert "lie_detector" not in resp.json()
        assert int(resp.headers["content-length"]) == len(resp.content)
        # The normal body: what the plugin-off server answers.
        base = post(vllm_server_disabled.base_url, api)
        assert normalised(resp.content) == normalised(base.content)

        streamed = post(served.server.base_url, api, stream=True, headers=ANNOTATE)
        assert streamed.status_code == 200
        events = sse_events(streamed.content)
        assert events[-1] == b"data: [DONE]"
        field = json.loads(events[-2].removeprefix(b"data: "))["lie_detector"]
        assert field["status"] == "unavailable" and field["reason"].startswith("sidecar-")
