"""Stop strings against a real vLLM server: the sidecar scores exactly what the client got.

vLLM matches stop strings in its API process, so the engine, and the sidecar with it, runs
one or more tokens past them. GetScores and StreamScores must still cover exactly the
returned text: tokens, text, span offsets; and a stream must never send a token past the
stop (it holds back a token that may begin one, as vLLM holds back such text)."""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest
from support import _served_model, complete, start_sidecar, wait_for_engine

from detector.serving.client import DetectorClient, RequestState

pytestmark = pytest.mark.vllm

# The model answers, then goes on with the next "Q:" (a few-shot prompt), or lists more
# fruits: past the stop string every time.
TWO_SHOT = ("Q: What is the capital of France?\nA: Paris\n"
            "Q: What is the capital of Germany?\nA: Berlin\n"
            "Q: What is the capital of Italy?\nA:")
FRUITS = "List three fruits, one per line."


@pytest.fixture(scope="module")
def client(vllm_server, probe_dir, model_dir, tmp_path_factory):
    proc = start_sidecar(vllm_server.channel, tmp_path_factory.mktemp("stops"),
                         probes=[probe_dir], model_dir=model_dir)
    try:
        with DetectorClient(proc.grpc_address) as client:
            wait_for_engine(client)
            yield client
    finally:
        proc.stop()


def chat(base_url: str, content: str, *, max_tokens: int, request_id: str,
         **extra: object) -> dict:
    """A greedy /v1/chat/completions call with the output token ids."""
    body = {"model": _served_model(base_url), "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": content}], "return_token_ids": True,
            **extra}
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body,
                      headers={"X-Request-Id": request_id}, timeout=300)
    resp.raise_for_status()
    return resp.json()


@pytest.mark.parametrize("api,prompt,stop,include", [
    ("completions", TWO_SHOT, ["\n"], False),
    ("completions", TWO_SHOT, ["\n"], True),
    # Several tokens long: "\n" must wait for the next token before it may be sent.
    ("completions", TWO_SHOT, ["\nQ:", "Paris"], False),
    ("chat", FRUITS, ["\n"], False),
    ("chat", FRUITS, ["\n"], True),
    ("chat", FRUITS, ["\n2."], False),
])
def test_scores_cover_exactly_the_returned_text(vllm_server, client, api, prompt, stop,
                                                include) -> None:
    request_id = f"stop-{uuid.uuid4().hex[:12]}"
    call = complete if api == "completions" else chat
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(resp=call(
        vllm_server.base_url, prompt, max_tokens=24, request_id=request_id, stop=stop,
        include_stop_str_in_output=include)))
    worker.start()
    streamed = []
    for update in client.stream_scores(request_id, timeout=120):
        streamed.extend(update.tokens)
    worker.join()
    choice = result["resp"]["choices"][0]
    text = choice["text"] if api == "completions" else choice["message"]["content"]
    # The stop string ended the request (not the end of sequence or the token budget).
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] in stop, choice

    scores = client.get_scores(request_id, wait_until_finished=True, timeout=60)
    assert scores.state is RequestState.FINISHED
    assert scores.text == text
    assert "".join(t.text for t in scores.tokens) == text
    # vLLM also returns the tokens that completed the stop; the sidecar keeps those that
    # hold returned text, a prefix.
    ids = [t.token_id for t in scores.tokens]
    assert ids == choice["token_ids"][:len(ids)]
    for span in scores.spans:
        assert 0 <= span.char_start <= span.char_end <= len(text)
        assert text[span.char_start:span.char_end] == span.text
        assert span.token_end <= len(scores.tokens)
    # The stream sent each token once, never one past the stop, and the same as GetScores.
    assert [(t.index, t.token_id, t.text) for t in streamed] == \
        [(t.index, t.token_id, t.text) for t in scores.tokens]
