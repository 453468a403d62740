"""The channel under hostile senders, through the real socket of an in-process sidecar.

Two requests are sent by a legitimate engine holding the channel key and finish. Then
10,000 messages come from a client without the key and 10,000 hostile ones from a client
with it: random mutations of real steps and heartbeats (other ids, the real requests' ids,
huge seqs and positions, token ids outside any vocabulary, forged engines and engine info,
steps that refer to their engine by id only or to engines never heard from, counters, wrong
payload sizes, garbage). Asserted: nothing from the keyless client is received; every
hostile message is rejected or handled without an exception escaping; the sidecar still
serves; the finished requests read exactly as before, byte for byte; memory stays bounded.
"""

from __future__ import annotations

import json
import random

import psutil
import pytest
import zmq
from support import free_port, wait_until
from tiny_engine import engine, probe, schedule, single_request

from detector.serving.client import DetectorClient, RequestState, Scores
from detector.channel.auth import client_options, read_key, write_key
from detector.channel.wire import (
    MAX_ENGINES_REMEMBERED,
    Heartbeat,
    encode_heartbeat,
    encode_step,
)
from detector.settings import SuiteSettings
from detector.sidecar.app import Sidecar, SidecarSettings

MESSAGES = SuiteSettings().channel_fuzz
MiB = 1 << 20
RSS_LIMIT = 256 * MiB


def _push(ctx: zmq.Context, endpoint: str, key: bytes | None) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 64)
    if key is not None:
        client_options(sock, key)
    sock.connect(endpoint)
    return sock


def _real_frames() -> list[list[bytes]]:
    """The two real requests' steps, as the hook encodes them."""
    return [[bytes(f) for f in encode_step(header, rows)] for header, rows in schedule()]


def _mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """One hostile message derived from a real one (or plain garbage)."""
    roll = rng.random()
    if roll < 0.05:
        return [rng.randbytes(rng.randint(0, 300))]
    if roll < 0.15:
        beat = Heartbeat(engine=engine(rng.choice(["e1", "forged"])), time_ns=rng.randint(0, 2**62),
                         dropped_total=rng.randint(0, 50), next_seq=rng.randint(50, 10**6))
        head = json.loads(bytes(encode_heartbeat(beat)[0]))
        if rng.random() < 0.5:
            head[rng.choice(["dropped_total", "next_seq", "queue_depth"])] = rng.choice(
                [-1, 2**70, 2_000_000_000, "x", None])
        return [json.dumps(head).encode()]
    head = json.loads(frames[0])
    payload = frames[1] if len(frames) > 1 else b""
    for _ in range(rng.randint(1, 4)):
        what = rng.randrange(12)
        reqs = head.get("requests") or []
        r = rng.choice(reqs) if reqs else None
        if what == 0:
            head["seq"] = rng.choice([rng.randint(0, 30), rng.randint(31, 2**40), -5])
        elif what == 1 and r is not None:
            r["req_id"] = rng.choice(["A", "B", f"new-{rng.randrange(500)}", "x" * 600])
        elif what == 2 and r is not None:
            r["first_position"] = rng.choice([0, 5, 2**20, 2**24, 2**30, -1])
        elif what == 3 and r is not None:
            key = rng.choice(["input_token_ids", "sampled_token_ids"])
            if r[key]:
                r[key][0] = rng.choice([2**70, -7, 2**31, 3])
        elif what == 4:
            head["finished"] = rng.choice([["A"], ["B"], ["A", "B", "zzz"], []])
        elif what == 5 and "engine" in head:
            head["engine"]["engine_id"] = rng.choice(["e1", "forged", ""])
        elif what == 6:
            head[rng.choice(["dropped_total", "queue_depth"])] = rng.choice(
                [2_000_000_000, -3, 2**70])
        elif what == 7:
            payload = payload[: rng.randrange(len(payload) + 1)] + rng.randbytes(
                rng.choice([0, 0, 4, 8]))
        elif what == 8 and r is not None:
            r["num_prompt_tokens"] = rng.choice([0, 1, 2**24, 2**25])
        elif what == 9 and "engine" in head:
            head["engine"]["vocab_size"] = rng.choice([None, 1, 150, 2**31])
            head["engine"]["max_model_len"] = rng.choice([None, 1, 8, 2**24])
        elif what == 10:  # refer to the engine by id only: read against the stored info
            head.pop("engine", None)
        elif what == 11:  # an engine never heard from, or not this step's engine
            head["engine_id"] = rng.choice([f"ghost-{rng.randrange(1000)}", "forged", "e2"])
            if rng.random() < 0.7:
                head.pop("engine", None)
    return [json.dumps(head).encode(), payload]


def _reads(client: DetectorClient) -> dict[str, Scores]:
    return {rid: client.get_scores(rid) for rid in ("A", "B")}


@pytest.fixture
def keyed_sidecar(tmp_path):
    key_file = write_key(tmp_path / "channel.key")
    probe_path = probe("p", [1, 3], "producer", 1).save(tmp_path / "p")
    sc = Sidecar(SidecarSettings(channel=f"ipc://{tmp_path}/ch/s.sock", channel_key_file=key_file,
                                 grpc_address=f"127.0.0.1:{free_port()}", metrics_port=None,
                                 probes=[probe_path], shutdown_grace_s=0,
                                 max_store_bytes=64 * MiB))
    sc.start()
    yield sc, read_key(key_file)
    sc.stop()




def test_hostile_senders_change_nothing_real(keyed_sidecar, caplog) -> None:
    sc, key = keyed_sidecar
    sub = sc.subscriber
    ctx = zmq.Context()
    real = _real_frames()
    try:
        with DetectorClient(sc.settings.grpc_address) as client:
            legit = _push(ctx, sc.settings.channel, key)
            for frames in real:
                legit.send_multipart(frames)
            wait_until(lambda: sub.received >= len(real), 120, 0.05, "the real steps")
            wait_until(lambda: all(
                client.get_scores(r).state is RequestState.FINISHED for r in ("A", "B")), 120, 0.05,
                "A and B finished")
            before = _reads(client)
            rss0 = psutil.Process().memory_info().rss

            # 1. Without the key: refused at the handshake, nothing ever received.
            received0 = sub.received + sub.rejected + sub.without_engine_info
            stranger = _push(ctx, sc.settings.channel, None)
            rng = random.Random(7)
            for i in range(MESSAGES):
                try:
                    stranger.send_multipart(_mutate(rng, real[i % len(real)]), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # no handshake, no pipe: a keyless sender only fills its own buffer
            wait_until(lambda: sub.rejected_connections > 0, 120, 0.05, "a refused connection")
            assert sub.received + sub.rejected + sub.without_engine_info == received0

            # 2. With the key, hostile contents: each one rejected or handled.
            rng = random.Random(11)
            for i in range(MESSAGES):
                legit.send_multipart(_mutate(rng, real[i % len(real)]))
            wait_until(lambda: sub.received + sub.rejected + sub.without_engine_info
                       >= received0 + MESSAGES, 120, 0.05,
                       f"all {MESSAGES} keyed messages read")
            print(f"fuzz: received {sub.received}, rejected {sub.rejected}, refused connections "
                  f"{sub.rejected_connections}, refused ended-request parts "
                  f"{sc.store.refused_finished}, without engine info "
                  f"{sub.without_engine_info}")
            assert sub.without_engine_info > 0, "no step referred to an unknown engine"
            assert len(sub.engines) <= MAX_ENGINES_REMEMBERED
            assert sub.engines.get("e1") == engine("e1"), "a forged info replaced the real one"
            failures = [r for r in caplog.records if r.levelno >= 40]  # ERROR: an exception
            assert not failures, f"hostile messages raised: {failures[0].getMessage()}"
            assert _reads(client) == before, "a hostile message changed a finished request"
            # Still scoring: a request from a (restarted) engine is read whole.
            for header, rows in single_request("C", [11, 12, 13], [301, 302, 303],
                                               eng=engine("e2")):
                legit.send_multipart([bytes(f) for f in encode_step(header, rows)])
            reply = client.get_scores("C", wait_until_finished=True, timeout=60)
            assert reply.state is RequestState.FINISHED
            assert [t.token_id for t in reply.tokens] == [301, 302, 303]
            assert all(t.scored for t in reply.tokens)
            grown = psutil.Process().memory_info().rss - rss0
            assert grown < RSS_LIMIT, f"memory grew {grown / MiB:.0f} MiB"
            stranger.close(linger=0)
            legit.close(linger=0)
    finally:
        ctx.term()
