"""How requests end when the engine does not say so, without vLLM.

- vLLM tells the worker that a request ended (abort, client timeout, stop string) in the
  next step; when the engine goes idle after it that step has no tokens and the hook never
  sees it. The sidecar ends running requests of an engine idle for ``engine_idle_s`` (as
  finished: every step arrived); the hook hands over the ids vLLM ends in a step without
  tokens (``end_requests``, called from the adapter's ``execute_model`` wrapper).
- A hook that falls silent (vLLM gone) ends running requests as incomplete, with a reason,
  so readers waiting for the end are released.
- Quiet, idle and silent are judged on the engine's clock and on time spent listening: a
  backlog the sidecar has not read yet (after it was stalled itself) is neither silence nor
  an idle engine.
- An inferred end is revived by the request's next token, and a gap still marks it.
- Heartbeats never announce a seq whose step is still waiting for its tokens (that looked
  like a dropped step and marked healthy requests incomplete).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from support import FakePublisher
from tiny_engine import MODEL, engine, probe, single_request

from detector.channel.publisher import ChannelPublisher, PendingStep
from detector.channel.subscriber import ChannelSubscriber
from detector.channel.wire import Heartbeat, StepHeader, decode, encode_step
from detector.engine.capture import ScheduledRequest, StepAssembler
from detector.sidecar import pipeline as pipeline_module
from detector.sidecar import store as store_module
from detector.sidecar.analysis import Analyzer
from detector.sidecar.metrics import SidecarMetrics
from detector.sidecar.pipeline import ScoringPipeline
from detector.sidecar.registry import ProbeRegistry
from detector.sidecar.store import RequestStore

PROMPT = [11, 12, 13, 14]
GENERATED = [101, 102, 103, 104, 105]


class Clock:
    """The sidecar's monotonic clock; the engine's clock (``time_ns`` in its messages) is
    the same reading, so a test moves both at once unless it says otherwise."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def ns(self) -> int:
        return int(self.now * 1e9)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(pipeline_module, "time",
                        SimpleNamespace(monotonic=fake.monotonic, time_ns=time.time_ns))
    monkeypatch.setattr(store_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def make_pipeline(*, idle_s: float = 5.0, hook_timeout_s: float = 3.0):
    registry = ProbeRegistry(served=MODEL, device=torch.device("cpu"))
    store = RequestStore(finished_ttl_s=600)
    registry.on_change.append(store.set_columns)
    registry.load(probe("prod", [1, 3], "producer", 1).save(
        Path(tempfile.mkdtemp(prefix="ld-probe-")) / "prod"))
    metrics = SidecarMetrics()
    subscriber = SimpleNamespace(rejected=0, rejected_connections=0, without_engine_info=0)
    pipe = ScoringPipeline(subscriber, registry, store, metrics, Analyzer(None),
                           hook_timeout_s=hook_timeout_s, engine_idle_s=idle_s)
    states: list[bool] = []
    pipe.on_hook_state.append(states.append)
    return pipe, store, metrics, states


def heartbeat(next_seq: int, clock: Clock) -> tuple:
    return Heartbeat(engine=engine(), time_ns=clock.ns(), next_seq=next_seq), None


def at(step: tuple, clock: Clock) -> tuple:
    """``step`` as the engine sends it now (its ``time_ns`` on the test's clock)."""
    header, rows = step
    return header.model_copy(update={"time_ns": clock.ns()}), rows


def listened(pipe: ScoringPipeline, seconds: float) -> None:
    """What the receive loop does after waiting ``seconds`` for a message in vain."""
    pipe.listened(seconds)
    pipe._housekeeping()


def ended_by_the_idle_rule(clock: Clock) -> tuple[ScoringPipeline, RequestStore, list]:
    """A request whose prefill arrived, then an engine idle past ``engine_idle_s`` (2 s):
    the idle rule has ended it. Returns the pipeline, its store and the request's steps."""
    pipe, store, _, _ = make_pipeline(idle_s=2.0)
    steps = single_request("slow", PROMPT, GENERATED)
    pipe.handle(at(steps[0], clock))
    clock.now += 3.0
    pipe.handle(heartbeat(1, clock))
    listened(pipe, 0.25)
    return pipe, store, steps


def test_requests_of_an_idle_engine_end_finished(clock: Clock) -> None:
    pipe, store, metrics, states = make_pipeline(idle_s=5.0)
    steps = single_request("cmpl-aborted-0-1a2b3c4d", PROMPT, GENERATED)
    for s in steps[:3]:  # aborted after three tokens: no finish ever arrives
        pipe.handle(at(s, clock))
    for _ in range(4):  # the idle engine heartbeats; not idle long enough yet
        clock.now += 1.0
        pipe.handle(heartbeat(3, clock))
        listened(pipe, 1.0)
    rec, _ = store.snapshot("aborted")
    assert not rec.finished
    for _ in range(3):
        clock.now += 1.0
        pipe.handle(heartbeat(3, clock))
        listened(pipe, 1.0)
    rec, tokens = store.snapshot("aborted")
    assert rec.finished and rec.incomplete is None
    assert [t.token_id for t in tokens] == GENERATED[:3]
    assert all("prod" in t.scores for t in tokens)
    assert metrics.requests_scored.labels("prod")._value.get() == 1  # judged once
    assert states == [True]  # the hook stayed connected throughout
    # A finished request then expires like any other.
    store.finished_ttl_s = 1.0
    clock.now += 2.0
    store.expire()
    assert store.snapshot("aborted") is None
    assert store.stats().requests == 0 and store.stats().bytes == 0


def test_a_request_ended_by_the_idle_rule_revives_with_its_next_token(clock: Clock) -> None:
    """A step longer than engine_idle_s (not an abort after all): no harm done."""
    pipe, store, steps = ended_by_the_idle_rule(clock)
    assert store.snapshot("slow")[0].finished
    for s in steps[1:]:
        clock.now += 0.1
        pipe.handle(at(s, clock))
    rec, tokens = store.snapshot("slow")
    assert rec.finished and rec.incomplete is None  # finished by its own last step
    assert [t.token_id for t in tokens] == GENERATED


def test_a_gap_after_an_inferred_end_still_marks_the_request(clock: Clock) -> None:
    """Ended by the idle rule, the request was only slow; then steps are dropped: it must
    not end FINISHED with a token unscored."""
    pipe, store, steps = ended_by_the_idle_rule(clock)
    assert store.snapshot("slow")[0].finished  # inferred
    pipe.handle(at(steps[1], clock))  # revived
    pipe.handle(at(steps[3], clock))  # step 2 (its rows, not its token ids) was dropped
    pipe.handle(at(steps[4], clock))
    rec, tokens = store.snapshot("slow")
    assert [t.token_id for t in tokens] == GENERATED
    assert rec.incomplete == "the channel dropped steps"
    assert not all("prod" in t.scores for t in tokens)


def test_an_inferred_end_then_a_gap_before_the_revival(clock: Clock) -> None:
    pipe, store, steps = ended_by_the_idle_rule(clock)
    pipe.handle(at(steps[2], clock))  # step 1 dropped while the request looked ended
    pipe.handle(at(steps[3], clock))
    pipe.handle(at(steps[4], clock))
    rec, _ = store.snapshot("slow")
    assert rec.finished and rec.incomplete == "the channel dropped steps"


def test_a_busy_engine_ends_only_quiet_requests_that_lost_steps(clock: Clock) -> None:
    """While steps flow, a request that lost steps and went quiet ended in a lost step; a
    request that is merely quiet (preempted, waiting for memory) is left alone."""
    pipe, store, _, _ = make_pipeline(idle_s=5.0)
    lost = single_request("lost", PROMPT, GENERATED)
    waiting = single_request("waiting", PROMPT, GENERATED, seq0=0)
    busy = single_request("busy", PROMPT, list(range(300, 340)), seq0=0)
    # One stream of steps: "lost" runs two steps, then its next two (holding its end) are
    # dropped; "waiting" then runs two steps and is preempted; "busy" keeps going.
    seq = 0
    for header, rows in lost[:2]:
        pipe.handle((header.model_copy(update={"seq": seq, "time_ns": clock.ns()}), rows))
        seq += 1
    seq += 2  # the dropped steps
    for header, rows in waiting[:2]:
        pipe.handle((header.model_copy(update={"seq": seq, "time_ns": clock.ns()}), rows))
        seq += 1
    for step in busy:
        clock.now += 0.5
        header, rows = step
        pipe.handle((header.model_copy(update={"seq": seq, "time_ns": clock.ns()}), rows))
        seq += 1
        pipe._housekeeping()
    rec, _ = store.snapshot("lost")
    assert rec.finished and rec.incomplete == "the channel dropped steps"
    rec, _ = store.snapshot("waiting")
    assert not rec.finished and rec.incomplete is None
    assert store.snapshot("busy")[0].finished


def test_a_silent_hook_ends_running_requests_incomplete(clock: Clock) -> None:
    pipe, store, metrics, states = make_pipeline(hook_timeout_s=3.0, idle_s=60.0)
    steps = single_request("cut", PROMPT, GENERATED)
    for s in steps[:2]:
        pipe.handle(at(s, clock))
    listened(pipe, 0.25)
    clock.now += 4.0  # vLLM died: nothing at all, the socket stays empty
    listened(pipe, 4.0)
    assert states == [True, False]
    rec, tokens = store.snapshot("cut")
    assert rec.finished and rec.incomplete and "fell silent" in rec.incomplete
    assert [t.token_id for t in tokens] == GENERATED[:2]
    assert metrics.requests_incomplete._value.get() == 1
    assert metrics.hook_connected._value.get() == 0
    assert store.wait("cut", until_finished=True, timeout_s=0.1)  # waiters are released


def test_an_unread_backlog_is_neither_silence_nor_an_idle_engine(clock: Clock) -> None:
    """The sidecar itself was stopped (SIGSTOP, starved of CPU) while the engine kept
    stepping: when it resumes, the hook's steps wait unread. The receive that spanned the
    stall counts as one receive's wait, and the request, quiet only on the sidecar's clock,
    is neither ended by the idle rule (which a stream would have taken as its final
    update) nor marked incomplete."""
    pipe, store, _, states = make_pipeline(hook_timeout_s=3.0, idle_s=2.0)
    steps = single_request("busy", PROMPT, GENERATED)
    engine_ns = clock.ns()
    pipe.handle(at(steps[0], clock))
    backlog = []
    for s in steps[1:]:  # what the engine sent during the stall, 0.1 s apart
        engine_ns += 100_000_000
        backlog.append((s[0].model_copy(update={"time_ns": engine_ns}), s[1]))
    # (seconds the receive takes, what it returns): the first spans the stall.
    script = iter([(30.0, None)] + [(0.01, m) for m in backlog])

    def recv(timeout_s: float):
        took, message = next(script, (timeout_s, None))
        clock.now += took
        if message is None and clock.now > 1030.0:
            pipe._stop.set()  # the backlog is read: end the loop
        return message

    pipe.subscriber.recv = recv
    pipe._run()  # housekeeping runs right after the stalled receive
    assert states == [True], "the stall was taken for a silent hook"
    rec, tokens = store.snapshot("busy")
    assert rec.finished and not rec.inferred_end and rec.incomplete is None
    assert [t.token_id for t in tokens] == GENERATED
    assert pipe.metrics.requests_scored.labels("prod")._value.get() == 1


# ------------------------------------------------------------------ the hook's side
def test_heartbeat_never_announces_a_step_still_waiting_for_tokens(tmp_path) -> None:
    endpoint = f"ipc://{tmp_path}/hb.sock"
    sub = ChannelSubscriber(endpoint)
    eng = engine()
    pub = ChannelPublisher(endpoint, eng, heartbeat_s=0.05)
    asm = StepAssembler(pub)
    try:
        rows = torch.zeros((len(eng.layers), len(PROMPT), 4))
        sched = [ScheduledRequest("r", len(PROMPT), 0, len(PROMPT), PROMPT)]
        step = asm.open_step(rows, sched, [])  # seq 0 taken; tokens not sampled yet
        beats = []
        deadline = time.monotonic() + 10
        while len(beats) < 4 and time.monotonic() < deadline:
            message = sub.recv(timeout_s=0.5)
            if message is not None and isinstance(message[0], Heartbeat):
                beats.append(message[0].next_seq)
        assert len(beats) == 4
        assert beats == [0] * 4, "a heartbeat ran ahead of an open step: a false gap"
        asm.close_step(step, {"r": [101]})
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (seen and seen[-1] == ("beat", 1)):
            message = sub.recv(timeout_s=0.5)
            if message is not None:
                header = message[0]
                seen.append(("step", header.seq) if isinstance(header, StepHeader)
                            else ("beat", header.next_seq))
        assert ("step", 0) in seen and seen[-1] == ("beat", 1)
        assert seen.index(("step", 0)) < seen.index(("beat", 1))
    finally:
        pub.close()
        sub.close()


def _wire(step: PendingStep) -> StepHeader:
    eng = engine()
    header = StepHeader(engine=eng, seq=step.seq, time_ns=step.time_ns,
                        num_rows=int(step.rows.shape[1]), requests=step.requests,
                        finished=step.finished)
    return decode([bytes(f) for f in encode_step(header, step.rows)])[0]


def test_end_requests_publishes_the_end_and_frees_the_history() -> None:
    pub = FakePublisher(engine())
    asm = StepAssembler(pub)  # type: ignore[arg-type]
    rows = torch.zeros((2, len(PROMPT), 4))
    step = asm.open_step(rows, [ScheduledRequest("r", len(PROMPT), 0, len(PROMPT), PROMPT)], [])
    asm.close_step(step, {"r": [101]})
    assert asm.knows("r")
    # vLLM ended "r" in a step without tokens (the engine went idle after an abort).
    assert asm.end_requests(["r"])
    assert not asm.knows("r"), "the ended request's history leaks"
    header = _wire(pub.offered[-1])  # a valid zero-row step, next in seq order
    assert header.num_rows == 0 and header.requests == [] and header.finished == ["r"]
    assert header.seq == 1


def test_end_requests_rides_on_a_step_still_waiting_for_tokens() -> None:
    pub = FakePublisher(engine())
    asm = StepAssembler(pub)  # type: ignore[arg-type]
    rows = torch.zeros((2, len(PROMPT), 4))
    first = asm.open_step(rows, [ScheduledRequest("r", len(PROMPT), 0, len(PROMPT), PROMPT)], [])
    asm.close_step(first, {"r": [101]})
    pending = asm.open_step(torch.zeros((2, 1, 4)), [ScheduledRequest("s", 1, 0, 1, [7])], [])
    asm.end_requests(["r"])
    assert len(pub.offered) == 1  # nothing overtakes the open step
    asm.close_step(pending, {"s": [8]})
    assert [s.seq for s in pub.offered] == [0, 1]
    assert pub.offered[-1].finished == ["r"]
    assert not asm.knows("r") and asm.knows("s")
