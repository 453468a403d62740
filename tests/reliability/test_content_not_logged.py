"""Prompts and completions are not logged by default.

A request with a distinctive prompt and completion goes through a real in-process sidecar
(the channel's decoder, the pipeline, the store, the analyzer with the embedded model's
tokenizer, gRPC reads, a stale replay and a malformed message) with every logger at DEBUG:
neither the text nor the token ids may appear in any log record. (The vLLM tests in this
folder check the same of a real sidecar process's log file.)
"""

from __future__ import annotations

import logging
import time

import pytest
import zmq
from support import free_port
from tiny_engine import engine, probe, single_request

from detector.serving.client import DetectorClient, DetectorError, RequestState
from detector.channel.wire import Heartbeat, encode_step
from detector.sidecar.app import Sidecar, SidecarSettings

PROMPT_TEXT = "Quizzical Zebediah Marmaduke-Fennimore whispered the passphrase"
COMPLETION_TEXT = " Xylophone Cthulhu ptarmigan 7731 Vercingetorix flibbertigibbet"


def _leaks(text: str, needles: dict[str, str]) -> list[str]:
    return [name for name, needle in needles.items() if needle and needle in text]


def test_prompt_and_completion_never_reach_the_logs(model_dir, tmp_path, caplog) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
    generated = tok.encode(COMPLETION_TEXT, add_special_tokens=False).ids
    assert len(generated) >= 8
    decoded = tok.decode(generated)
    needles = {
        "completion text": COMPLETION_TEXT.strip(),
        "decoded completion": decoded.strip(),
        "prompt text": PROMPT_TEXT,
        "distinctive word": "Vercingetorix",
        "prompt word": "Zebediah",
        "completion ids": ", ".join(map(str, generated[:4])),
        "completion ids (spaces)": " ".join(map(str, generated[:4])),
        "prompt ids": ", ".join(map(str, prompt[-4:])),
    }
    channel = f"ipc://{tmp_path}/ch.sock"
    settings = SidecarSettings(channel=channel, grpc_address=f"127.0.0.1:{free_port()}",
                               metrics_port=None, model_dir=model_dir, shutdown_grace_s=0)
    caplog.set_level(logging.DEBUG)  # the root logger and everything under it
    sidecar = Sidecar(settings)
    sidecar.start()
    try:
        steps = single_request("chatcmpl-secret-1a2b3c4d", prompt, generated)
        # A heartbeat makes the engine known, so the tiny probe fits.
        sidecar.pipeline.handle((Heartbeat(engine=engine(), time_ns=time.time_ns()), None))
        sidecar.registry.load(probe("prod", [1, 3], "producer", 1).save(tmp_path / "prod"))
        sidecar.pipeline.handle(steps[0])
        # Over the real socket, as the hook sends them, then a replay and garbage.
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(channel)
        try:
            for header, rows in steps[1:] + [steps[1]]:
                push.send_multipart(encode_step(header, rows), copy=False)
            push.send_multipart([b'{"kind": "step", "requests": ' + str(generated).encode(),
                                 b"\x00"])
            with DetectorClient(settings.grpc_address) as client:
                reply = client.get_scores("secret", wait_until_finished=True, timeout=30)
                assert reply.state is RequestState.FINISHED, reply.incomplete_reason
                assert [t.token_id for t in reply.tokens] == generated
                assert reply.text == decoded  # the sidecar did decode the text ...
                assert all(t.scored for t in reply.tokens)
                streamed = "".join(t.text for u in client.stream_scores("secret", timeout=30)
                                   for t in u.tokens)
                assert streamed == decoded
                with pytest.raises(DetectorError):
                    client.get_scores("missing", timeout=5)
            deadline = time.monotonic() + 10
            while sidecar.subscriber.rejected < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sidecar.subscriber.rejected >= 1
            time.sleep(1.2)  # one housekeeping round: gauges, hook state, stale counts
            # Both refusals are counted: the malformed message and the replayed step.
            assert sidecar.metrics.messages_rejected._value.get() >= 2
        finally:
            push.close(linger=0)
    finally:
        sidecar.stop()
    records = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records) or records, "no logs captured"
    assert "rejected a message" in records  # the malformed message was logged ...
    assert "stale" in records  # ... and the replay
    leaked = _leaks(records, needles)
    assert not leaked, f"logged: {leaked}"  # ... but nothing it carried
    # The aliases of the id are known to the API; the id may be logged, not the content.
    assert _leaks(caplog.text, needles) == []
