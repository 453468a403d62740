"""Engine info sent once per engine epoch, then referred to by id (issue 24).

A step names its engine (``engine_id``) and carries the full ``EngineInfo`` only when the
sidecar may not have it: the epoch's first step, the first after a sidecar connects or
after a step that carried it was dropped, and one at least every ``engine_info_s``. The
sidecar reads the others against the info it keeps per engine id (a bounded cache); a
step it cannot place is dropped and counted, a step whose info contradicts what its
engine sent before is refused as forged.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from detector.channel.publisher import ChannelPublisher, PendingStep
from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import (
    MAX_ENGINES_REMEMBERED,
    WIRE_VERSION,
    EngineInfo,
    EngineInfoCache,
    EngineInfoMismatch,
    Heartbeat,
    RequestRows,
    StepHeader,
    UnknownEngine,
    WireError,
    decode,
    encode_heartbeat,
    encode_step,
)
from detector.sidecar.analysis import Analyzer
from detector.sidecar.metrics import SidecarMetrics
from detector.sidecar.pipeline import ScoringPipeline
from detector.sidecar.registry import ProbeRegistry
from detector.sidecar.store import RequestStore
from test_channel import endpoint  # noqa: F401  (the shared socket-path fixture)

LAYERS = [1, 2]
HIDDEN = 4


def engine(engine_id: str = "e1", **overrides: object) -> EngineInfo:
    fields: dict = dict(engine_id=engine_id, model="tiny", hidden_size=HIDDEN, num_layers=4,
                        layers=LAYERS, dtype="float32", capture_method="forward_hook",
                        pid=os.getpid(), started_at=1.0, vocab_size=500, max_model_len=64)
    fields.update(overrides)
    return EngineInfo(**fields)


def rows_of(n: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((len(LAYERS), n, HIDDEN), value, dtype=torch.float32)


def step_frames(seq: int, eng: EngineInfo, *, carry: bool, tokens: tuple[int, ...] = (5, 6),
                req_id: str = "r") -> list[bytes]:
    """One step of one request over ``len(tokens)`` rows, with or without the info."""
    req = RequestRows(req_id=req_id, row_offset=0, num_rows=len(tokens), first_position=0,
                      num_prompt_tokens=len(tokens), input_token_ids=list(tokens),
                      sampled_token_ids=[7])
    header = StepHeader(engine_id=eng.engine_id, engine=eng if carry else None, seq=seq,
                        time_ns=1000 + seq, num_rows=len(tokens), requests=[req])
    return [bytes(f) for f in encode_step(header, rows_of(len(tokens), float(seq)), eng)]


# ------------------------------------------------------------------ the wire
def test_a_step_without_info_decodes_against_the_cached_info() -> None:
    cache = EngineInfoCache()
    eng = engine()
    first = step_frames(0, eng, carry=True)
    later = step_frames(1, eng, carry=False)
    assert len(later[0]) < len(first[0]) and b'"engine"' not in later[0]
    header, _ = decode(first, cache)
    assert header.engine == eng and "e1" in cache
    header, rows = decode(later, cache)
    assert header.engine == eng and header.engine_id == "e1"
    assert header.engine is cache.get("e1")  # the stored info itself, not a copy
    assert torch.equal(rows, rows_of(2, 1.0))


def test_a_heartbeat_teaches_the_cache_too() -> None:
    cache = EngineInfoCache()
    decode(encode_heartbeat(Heartbeat(engine=engine(), time_ns=1)), cache)
    header, _ = decode(step_frames(3, engine(), carry=False), cache)
    assert header.seq == 3


def test_shares_are_checked_against_the_cached_info() -> None:
    """The engine's vocabulary and context length still bound a step that does not carry
    them: the offending share is refused alone."""
    cache = EngineInfoCache()
    decode(step_frames(0, engine(), carry=True), cache)
    header, _ = decode(step_frames(1, engine(), carry=False, tokens=(5, 500)), cache)
    assert header.requests == []
    (refused,) = header.refused
    assert refused.req_id == "r" and "vocabulary (0..499)" in refused.reason


def test_a_step_of_an_unknown_engine_is_dropped_as_unknown() -> None:
    cache = EngineInfoCache()
    frames = step_frames(0, engine(), carry=False)
    with pytest.raises(UnknownEngine, match="engine e1"):
        decode(frames, cache)
    with pytest.raises(UnknownEngine):
        decode(frames)  # no cache at all: only steps that carry their info decode
    # Another engine's info does not make it known.
    decode(step_frames(0, engine("e2"), carry=True), cache)
    with pytest.raises(UnknownEngine):
        decode(frames, cache)


@pytest.mark.parametrize("change", [
    {"layers": [1, 3]}, {"hidden_size": HIDDEN}, {"vocab_size": 10**6}, {"dtype": "float16"},
    {"model": "other"}, {"pid": 1},
])
def test_info_that_differs_from_the_stored_info_is_refused(change: dict) -> None:
    cache = EngineInfoCache()
    eng = engine()
    decode(step_frames(0, eng, carry=True), cache)
    forged = eng.model_copy(update=change)
    if forged == eng:  # hidden_size unchanged: make sure something differs
        forged = eng.model_copy(update={"started_at": 2.0})
    head = json.loads(step_frames(1, eng, carry=True)[0])
    head["engine"] = json.loads(forged.model_dump_json())
    frames = [json.dumps(head).encode(), step_frames(1, eng, carry=True)[1]]
    with pytest.raises(EngineInfoMismatch, match="differs"):
        decode(frames, cache)
    beat = Heartbeat(engine=forged, time_ns=1)
    with pytest.raises(EngineInfoMismatch):
        decode(encode_heartbeat(beat), cache)
    assert cache.get("e1") == eng  # the first info stays
    header, _ = decode(step_frames(2, eng, carry=False), cache)
    assert header.engine == eng


def test_an_engine_id_that_is_not_its_engines_is_refused() -> None:
    head = json.loads(step_frames(0, engine(), carry=True)[0])
    head["engine_id"] = "e2"
    with pytest.raises(WireError, match="engine_id"):
        decode([json.dumps(head).encode(), step_frames(0, engine(), carry=True)[1]],
               EngineInfoCache())


@pytest.mark.parametrize("engine_id", ["", "x" * 129, "has space", "new\nline", 7, None])
def test_hostile_engine_ids_are_refused(engine_id: object) -> None:
    head = json.loads(step_frames(0, engine(), carry=False)[0])
    head["engine_id"] = engine_id
    with pytest.raises(WireError, match="engine_id"):
        decode([json.dumps(head).encode(), step_frames(0, engine(), carry=False)[1]],
               EngineInfoCache())


def test_the_cache_is_bounded_and_keeps_the_engines_in_use() -> None:
    cache = EngineInfoCache()
    decode(step_frames(0, engine("keep"), carry=True), cache)
    for i in range(3 * MAX_ENGINES_REMEMBERED):
        decode(step_frames(0, engine(f"e{i}"), carry=True), cache)
        decode(step_frames(1, engine("keep"), carry=False), cache)  # in use: stays
        assert len(cache) <= MAX_ENGINES_REMEMBERED
    assert "keep" in cache and "e0" not in cache
    with pytest.raises(UnknownEngine):
        decode(step_frames(5, engine("e0"), carry=False), cache)
    # A forgotten engine is learnt again from its next info-carrying step.
    decode(step_frames(6, engine("e0"), carry=True), cache)
    assert decode(step_frames(7, engine("e0"), carry=False), cache)[0].seq == 7


def test_a_rejected_message_teaches_the_cache_nothing() -> None:
    cache = EngineInfoCache()
    frames = step_frames(0, engine(), carry=True)
    with pytest.raises(WireError, match="rows frame"):
        decode([frames[0], frames[1][:-4]], cache)
    assert "e1" not in cache


def test_a_version_1_step_still_decodes() -> None:
    """A sidecar can be upgraded before its engines: a version 1 step carries its engine
    and no engine_id."""
    head = json.loads(step_frames(0, engine(), carry=True)[0])
    head["version"] = 1
    del head["engine_id"]
    payload = step_frames(0, engine(), carry=True)[1]
    header, _ = decode([json.dumps(head).encode(), payload], EngineInfoCache())
    assert header.engine_id == "e1" and header.engine == engine()
    del head["engine"]
    with pytest.raises(WireError):
        decode([json.dumps(head).encode(), payload], EngineInfoCache())
    assert WIRE_VERSION == 2


def test_fuzzed_steps_against_a_cache_never_crash_or_change_the_stored_info() -> None:
    rng = random.Random(24)
    cache = EngineInfoCache(size=3)
    eng = engine()
    decode(step_frames(0, eng, carry=True), cache)
    seeds = [step_frames(1, eng, carry=c) for c in (True, False)]
    seeds.append(step_frames(1, engine("e9"), carry=True))
    outcomes = {"ok": 0, "unknown": 0, "mismatch": 0, "other": 0}
    for _ in range(3000):
        head = json.loads(rng.choice(seeds)[0])
        payload = seeds[0][1]
        for _ in range(rng.randint(1, 3)):
            what = rng.randrange(6)
            if what == 0:
                head["engine_id"] = rng.choice(["e1", "e9", f"n{rng.randrange(50)}", "", None])
            elif what == 1:
                head.pop("engine", None)
            elif what == 2 and isinstance(head.get("engine"), dict):
                head["engine"][rng.choice(["vocab_size", "pid", "hidden_size", "engine_id"])] = \
                    rng.choice([1, 7, 2**40, "e1", None])
            elif what == 3:
                head["engine"] = json.loads(engine(rng.choice(["e1", "e2", "e3"])).model_dump_json())
            elif what == 4:
                head["seq"] = rng.choice([-1, 3, 2**70])
            else:
                payload = payload[: rng.randrange(len(payload) + 1)]
        try:
            header, rows = decode([json.dumps(head).encode(), payload], cache)
        except UnknownEngine:
            outcomes["unknown"] += 1
        except EngineInfoMismatch:
            outcomes["mismatch"] += 1
        except WireError:
            outcomes["other"] += 1
        else:
            outcomes["ok"] += 1
            assert header.engine is not None and header.engine.engine_id == header.engine_id
            assert rows.shape == (len(header.engine.layers), header.num_rows,
                                  header.engine.hidden_size)
        assert len(cache) <= 3
        known = cache.get("e1")
        assert known is None or known == eng
    assert all(outcomes.values()), outcomes


# ------------------------------------------------------------------ the publisher
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pending(pub: ChannelPublisher) -> PendingStep:
    seq = pub.take_seq()
    req = RequestRows(req_id=f"req-{seq}", row_offset=0, num_rows=1, first_position=seq,
                      num_prompt_tokens=1, input_token_ids=[seq], sampled_token_ids=[seq + 1])
    return PendingStep(seq=seq, time_ns=time.time_ns(), rows=rows_of(1, float(seq)),
                       requests=[req], finished=[], hook_ns=1)


def next_step(sub: ChannelSubscriber, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = sub.recv(timeout_s=max(0.0, deadline - time.monotonic()))
        if message is not None and isinstance(message[0], StepHeader):
            return message
    pytest.fail("no step arrived")


def raw_steps(sub: ChannelSubscriber, n: int, timeout_s: float = 10.0) -> list[dict]:
    """The next ``n`` step headers as sent (JSON), read off the subscriber's own socket
    (before decoding, which fills in the info a step refers to)."""
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sub._sock.poll(100):
            head = json.loads(sub._sock.recv_multipart()[0])
            if head["kind"] == "step":
                out.append(head)
    assert len(out) == n, f"only {len(out)} of {n} steps arrived"
    return out


def connected(endpoint: str, **kwargs) -> tuple[ChannelPublisher, ChannelSubscriber]:
    sub = ChannelSubscriber(endpoint)
    pub = ChannelPublisher(endpoint, engine(), heartbeat_s=0.02, **kwargs)
    deadline = time.monotonic() + 10
    while not isinstance((sub.recv(timeout_s=0.1) or (None,))[0], Heartbeat):
        if time.monotonic() > deadline:
            pub.close()
            sub.close()
            pytest.fail("publisher never connected")
    return pub, sub


def test_info_rides_on_the_first_step_then_once_per_interval(endpoint: str) -> None:
    clock = FakeClock()
    pub, sub = connected(endpoint, engine_info_s=1.0, clock=clock)
    try:
        for _ in range(3):
            assert pub.offer(pending(pub))
        first = raw_steps(sub, 3)
        assert ["engine" in h for h in first] == [True, False, False]
        assert all(h["engine_id"] == "e1" and h["version"] == WIRE_VERSION for h in first)
        clock.now += 0.5  # within the interval: still referred to
        assert pub.offer(pending(pub))
        assert "engine" not in raw_steps(sub, 1)[0]
        clock.now += 0.6  # past it: carried once more, then referred to again
        for _ in range(2):
            assert pub.offer(pending(pub))
        assert ["engine" in h for h in raw_steps(sub, 2)] == [True, False]
        assert pub.info_steps == 2
    finally:
        pub.close()
        sub.close()


def test_a_restarted_sidecar_reads_steps_without_waiting_for_the_interval(
        endpoint: str) -> None:
    """With the interval and heartbeats (which always carry the info) far away, only the
    reconnection can bring the info to a new sidecar: the first step after it connects
    carries it."""
    clock = FakeClock()
    pub, sub = connected(endpoint, engine_info_s=3600.0, clock=clock)
    pub.heartbeat_s = 3600.0
    try:
        assert pub.offer(pending(pub))
        assert next_step(sub)[0].engine == engine()
        sub.close()
        sub = ChannelSubscriber(endpoint)  # a new sidecar, with an empty cache
        header, rows = next_step_while_offering(pub, sub)
        assert header.engine == engine() and torch.equal(rows, rows_of(1, float(header.seq)))
        assert sub.without_engine_info <= 1  # at most a step racing the handshake
    finally:
        pub.close()
        sub.close()


def next_step_while_offering(pub: ChannelPublisher, sub: ChannelSubscriber,
                             timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pub.offer(pending(pub))
        message = sub.recv(timeout_s=0.05)
        if message is not None and isinstance(message[0], StepHeader):
            return message
    pytest.fail("the new sidecar never read a step")


def test_a_dropped_info_step_is_followed_by_another(endpoint: str) -> None:
    """The step that carried the info was dropped (no sidecar yet): the next one carries
    it, whatever the interval."""
    clock = FakeClock()
    Path(endpoint[len("ipc://"):]).parent.mkdir(mode=0o700)  # private, but nobody bound
    pub = ChannelPublisher(endpoint, engine(), heartbeat_s=3600.0, engine_info_s=3600.0,
                           clock=clock)
    sub = None
    try:
        assert pub.offer(pending(pub))
        deadline = time.monotonic() + 10
        while pub.dropped < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.dropped == 1 and pub.info_steps == 0
        sub = ChannelSubscriber(endpoint)
        header, _ = next_step_while_offering(pub, sub)
        assert header.engine == engine()
    finally:
        pub.close()
        if sub is not None:
            sub.close()


# ------------------------------------------------------------------ the sidecar
def test_steps_without_known_info_are_counted_apart_from_malformed_ones(endpoint: str) -> None:
    """Dropped (their requests then look like requests whose steps were lost) and counted in
    lie_detector_channel_steps_without_engine_info_total, not as rejected messages."""
    import zmq

    sub = ChannelSubscriber(endpoint)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    try:
        push.send_multipart(step_frames(0, engine(), carry=False))
        push.send_multipart(step_frames(1, engine(), carry=True))
        header, _ = next_step(sub)
        assert header.seq == 1
        assert (sub.without_engine_info, sub.rejected) == (1, 0)
        metrics = SidecarMetrics()
        pipe = ScoringPipeline(sub, ProbeRegistry(device=torch.device("cpu")), RequestStore(),
                               metrics, Analyzer(None))
        pipe._housekeeping()
        assert metrics.registry.get_sample_value(
            "lie_detector_channel_steps_without_engine_info_total") == 1
        assert metrics.registry.get_sample_value(
            "lie_detector_channel_rejected_messages_total") == 0
    finally:
        push.close()
        ctx.term()
        sub.close()


def test_the_pipeline_keys_a_step_by_its_engine_id() -> None:
    """A request first seen after its engine's info arrived mid-run is marked incomplete
    (its earlier steps were dropped), like any request whose steps were lost."""
    cache = EngineInfoCache()
    store = RequestStore()
    pipe = ScoringPipeline(SimpleNamespace(rejected=0, rejected_connections=0,
                                           without_engine_info=1),
                           ProbeRegistry(device=torch.device("cpu")), store, SidecarMetrics(),
                           Analyzer(None))
    eng = engine()
    req = RequestRows(req_id="late", row_offset=0, num_rows=1, first_position=9,
                      num_prompt_tokens=4, input_token_ids=[3], sampled_token_ids=[4])
    header = StepHeader(engine=eng, seq=8, time_ns=1, num_rows=1, requests=[req])
    pipe.handle(decode([bytes(f) for f in encode_step(header, rows_of(1))], cache))
    rec, _ = store.snapshot("late")
    assert rec.engine_id == "e1" and rec.incomplete
