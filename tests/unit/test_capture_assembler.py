"""StepAssembler: every row carries the token it read, whatever the scheduling or the channel does."""

from __future__ import annotations

import pytest
import torch

from detector.channel.ids import bounded_engine_id
from detector.channel.publisher import PendingStep
from detector.channel.wire import EngineInfo, StepHeader, decode, encode_step
from detector.engine.capture import ScheduledRequest, StepAssembler
from support import FakePublisher

LAYERS = [1, 3]
HIDDEN = 4
ENGINE = EngineInfo(
    engine_id="e", model="tiny", hidden_size=HIDDEN, num_layers=6, layers=LAYERS,
    dtype="float32", capture_method="forward_hook", pid=1, started_at=0.0,
)

PROMPT_A = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
PROMPT_B = [31, 32, 33]


def sched(req_id: str, first: int, n: int, prompt: list[int]) -> ScheduledRequest:
    return ScheduledRequest(req_id=req_id, num_rows=n, first_position=first,
                            num_prompt_tokens=len(prompt), prompt_token_ids=prompt)


def sched_none(req_id: str, first: int, n: int, num_prompt: int) -> ScheduledRequest:
    return ScheduledRequest(req_id, n, first, num_prompt, None)


def rows_for(scheduled: list[ScheduledRequest]) -> torch.Tensor:
    n = sum(s.num_rows for s in scheduled)
    return torch.arange(len(LAYERS) * n * HIDDEN, dtype=torch.float32).view(len(LAYERS), n, HIDDEN)


def run_step(asm: StepAssembler, scheduled: list[ScheduledRequest],
             sampled: dict[str, list[int]], finished: tuple[str, ...] = ()) -> PendingStep:
    step = asm.open_step(rows_for(scheduled), scheduled, list(finished))
    asm.close_step(step, sampled)
    return asm.publisher.offered[-1]


def inputs(step: PendingStep) -> dict[str, list[int]]:
    return {r.req_id: list(r.input_token_ids) for r in step.requests}


def as_message(step: PendingStep) -> StepHeader:
    """Through the real wire format: the assembled step must pass full validation."""
    header = StepHeader.model_construct(
        kind="step", version=2, engine_id=ENGINE.engine_id, engine=ENGINE, seq=step.seq,
        time_ns=step.time_ns,
        num_rows=int(step.rows.shape[1]), requests=step.requests, finished=step.finished,
        hook_ns=step.hook_ns, dropped_total=0,
    )
    got, rows = decode([bytes(f) for f in encode_step(header, step.rows)])
    assert torch.equal(rows, step.rows)
    return got


@pytest.fixture
def asm() -> StepAssembler:
    return StepAssembler(FakePublisher())  # type: ignore[arg-type]


def test_chunked_prompt_then_decode(asm: StepAssembler) -> None:
    s0 = run_step(asm, [sched("A", 0, 6, PROMPT_A)], {"A": []})  # partial chunk samples nothing
    s1 = run_step(asm, [sched("A", 6, 4, PROMPT_A)], {"A": [100]})
    s2 = run_step(asm, [sched("A", 10, 1, PROMPT_A)], {"A": [101]})
    s3 = run_step(asm, [sched("A", 11, 1, PROMPT_A)], {"A": [102]})
    assert inputs(s0) == {"A": PROMPT_A[:6]}
    assert inputs(s1) == {"A": PROMPT_A[6:]}
    assert inputs(s2) == {"A": [100]}  # step t's sampled token is step t+1's input
    assert inputs(s3) == {"A": [101]}
    assert [s.requests[0].sampled_token_ids for s in (s0, s1, s2, s3)] == [[], [100], [101], [102]]
    assert [s.seq for s in (s0, s1, s2, s3)] == [0, 1, 2, 3]
    for s in (s0, s1, s2, s3):
        header = as_message(s)
        assert header.requests[0].num_prompt_tokens == len(PROMPT_A)
    assert s2.requests[0].first_position == 10


def test_batched_requests_get_their_own_tokens_and_row_offsets(asm: StepAssembler) -> None:
    run_step(asm, [sched("A", 0, 10, PROMPT_A)], {"A": [100]})
    # A decodes while B's prompt arrives in two chunks in the same steps.
    s1 = run_step(asm, [sched("A", 10, 1, PROMPT_A), sched("B", 0, 2, PROMPT_B)],
                  {"A": [101], "B": []})
    s2 = run_step(asm, [sched("B", 2, 1, PROMPT_B), sched("A", 11, 1, PROMPT_A)],
                  {"A": [102], "B": [200]})
    s3 = run_step(asm, [sched("A", 12, 1, PROMPT_A), sched("B", 3, 1, PROMPT_B)],
                  {"A": [103], "B": [201]})
    assert inputs(s1) == {"A": [100], "B": [31, 32]}
    assert inputs(s2) == {"B": [33], "A": [101]}
    assert inputs(s3) == {"A": [102], "B": [200]}
    assert [(r.req_id, r.row_offset, r.num_rows) for r in s2.requests] == [("B", 0, 1),
                                                                          ("A", 1, 1)]
    assert [(r.req_id, r.row_offset) for r in s1.requests] == [("A", 0), ("B", 1)]
    for s in (s1, s2, s3):
        as_message(s)


def test_preempted_request_recomputed_from_zero_reads_the_same_tokens(asm: StepAssembler) -> None:
    run_step(asm, [sched("A", 0, 10, PROMPT_A)], {"A": [100]})
    run_step(asm, [sched("A", 10, 1, PROMPT_A)], {"A": [101]})
    # Preempted after sampling 101 (never fed back); recomputed whole: prompt + 100 + 101.
    again = run_step(asm, [sched("A", 0, 12, PROMPT_A)], {"A": [102]})
    assert inputs(again) == {"A": PROMPT_A + [100, 101]}
    after = run_step(asm, [sched("A", 12, 1, PROMPT_A)], {"A": [103]})
    assert inputs(after) == {"A": [102]}
    as_message(again)


def test_preempted_request_recomputed_in_chunks(asm: StepAssembler) -> None:
    run_step(asm, [sched("A", 0, 10, PROMPT_A)], {"A": [100]})
    run_step(asm, [sched("A", 10, 1, PROMPT_A)], {"A": [101]})
    run_step(asm, [sched("A", 11, 1, PROMPT_A)], {"A": [102]})
    c1 = run_step(asm, [sched("A", 0, 8, PROMPT_A)], {"A": []})
    c2 = run_step(asm, [sched("A", 8, 5, PROMPT_A)], {"A": [103]})
    nxt = run_step(asm, [sched("A", 13, 1, PROMPT_A)], {"A": [104]})
    assert inputs(c1) == {"A": PROMPT_A[:8]}
    assert inputs(c2) == {"A": PROMPT_A[8:] + [100, 101, 102]}
    assert inputs(nxt) == {"A": [103]}


def test_rerun_that_resamples_overwrites_what_was_never_fed_back(asm: StepAssembler) -> None:
    run_step(asm, [sched("A", 0, 10, PROMPT_A)], {"A": [100]})
    run_step(asm, [sched("A", 10, 1, PROMPT_A)], {"A": [101]})
    # Recomputed only up to position 10 (101 discarded): it samples a different token.
    run_step(asm, [sched("A", 0, 11, PROMPT_A)], {"A": [555]})
    nxt = run_step(asm, [sched("A", 11, 1, PROMPT_A)], {"A": [556]})
    assert inputs(nxt) == {"A": [555]}


def test_finished_requests_are_forgotten(asm: StepAssembler) -> None:
    run_step(asm, [sched("A", 0, 10, PROMPT_A)], {"A": [100]})
    run_step(asm, [sched("B", 0, 3, PROMPT_B)], {"B": [200]})
    assert asm.knows("A") and asm.knows("B")
    last = run_step(asm, [sched("B", 3, 1, PROMPT_B)], {"B": [201]}, finished=("A",))
    assert not asm.knows("A")
    assert asm.knows("B")
    assert last.finished == ["A"]
    assert "A" not in asm._history
    # The same id again is a new request with its own prompt, not the old history.
    fresh = run_step(asm, [sched("A", 0, 3, [7, 8, 9])], {"A": [70]})
    assert inputs(fresh) == {"A": [7, 8, 9]}
    asm.forget(["B"])
    assert not asm.knows("B")


def test_asynchronous_resolution_in_step_order(asm: StepAssembler) -> None:
    # Step t+1 is launched before step t's tokens are known.
    t0 = asm.open_step(rows_for([sched("A", 0, 10, PROMPT_A)]), [sched("A", 0, 10, PROMPT_A)], [])
    t1 = asm.open_step(rows_for([sched_none("A", 10, 1, 10)]), [sched_none("A", 10, 1, 10)], [])
    asm.close_step(t0, {"A": [100]})
    t2 = asm.open_step(rows_for([sched_none("A", 11, 1, 10)]), [sched_none("A", 11, 1, 10)], [])
    asm.close_step(t1, {"A": [101]})
    t3 = asm.open_step(rows_for([sched_none("A", 12, 1, 10)]), [sched_none("A", 12, 1, 10)], [])
    asm.close_step(t2, {"A": [102]})
    asm.close_step(t3, {"A": [103]})
    offered = asm.publisher.offered
    assert [inputs(s) for s in offered] == [{"A": PROMPT_A}, {"A": [100]}, {"A": [101]},
                                            {"A": [102]}]
    assert [s.seq for s in offered] == [0, 1, 2, 3]
    for s in offered:
        as_message(s)


def test_asynchronous_resolution_with_two_requests(asm: StepAssembler) -> None:
    a0 = [sched("A", 0, 10, PROMPT_A), sched("B", 0, 3, PROMPT_B)]
    t0 = asm.open_step(rows_for(a0), a0, [])
    a1 = [sched_none("A", 10, 1, 10), sched_none("B", 3, 1, 3)]
    t1 = asm.open_step(rows_for(a1), a1, [])
    asm.close_step(t0, {"A": [100], "B": [200]})
    asm.close_step(t1, {"A": [101], "B": [201]})
    assert inputs(asm.publisher.offered[1]) == {"A": [100], "B": [200]}


def test_dropped_step_does_not_shift_later_tokens(asm: StepAssembler) -> None:
    pub = asm.publisher
    run_step(asm, [sched("A", 0, 10, PROMPT_A)], {"A": [100]})
    pub.accept = False
    s = asm.open_step(rows_for([sched("A", 10, 1, PROMPT_A)]), [sched("A", 10, 1, PROMPT_A)], [])
    assert asm.close_step(s, {"A": [101]}) is False  # the channel refused it
    pub.accept = True
    nxt = run_step(asm, [sched("A", 11, 1, PROMPT_A)], {"A": [102]})
    assert inputs(nxt) == {"A": [101]}
    assert nxt.requests[0].first_position == 11
    # The refused step still used up its seq: the sidecar sees the gap.
    assert [p.seq for p in pub.offered] == [0, 1, 2]


def test_capture_starting_mid_request_marks_unknown_tokens(asm: StepAssembler) -> None:
    # First seen while decoding: only the prompt is known, the tokens since are not.
    s = run_step(asm, [sched("A", 12, 1, PROMPT_A)], {"A": [300]})
    assert inputs(s) == {"A": [-1]}
    nxt = run_step(asm, [sched("A", 13, 1, PROMPT_A)], {"A": [301]})
    assert inputs(nxt) == {"A": [300]}


def test_prompt_ids_unavailable(asm: StepAssembler) -> None:
    s = run_step(asm, [sched_none("A", 0, 4, 4)], {"A": [9]})
    assert inputs(s) == {"A": [-1, -1, -1, -1]}
    nxt = run_step(asm, [sched_none("A", 4, 1, 4)], {"A": [10]})
    assert inputs(nxt) == {"A": [9]}


def test_hook_time_and_rows_are_handed_over(asm: StepAssembler) -> None:
    scheduled = [sched("A", 0, 10, PROMPT_A)]
    rows = rows_for(scheduled)
    marker = []
    step = asm.open_step(rows, scheduled, [], hook_ns=5, ready=lambda: marker.append(1))
    asm.close_step(step, {"A": [1]}, hook_ns=7)
    pending = asm.publisher.offered[-1]
    assert pending.rows is rows
    assert pending.hook_ns == 12
    pending.ready()
    assert marker == [1]


def test_request_finished_while_a_later_step_is_still_open(asm: StepAssembler) -> None:
    """With async scheduling a request that stops at step t may already be in step t+1: that
    row still reads the stop token, its sampled token (which vLLM discards) is not
    published, and the history is forgotten once no open step holds the request."""
    s0 = [sched("A", 0, 10, PROMPT_A)]
    t0 = asm.open_step(rows_for(s0), s0, [])
    s1 = [sched_none("A", 10, 1, 10)]  # scheduled before vLLM knew A had stopped
    t1 = asm.open_step(rows_for(s1), s1, [])
    t0.finished.append("A")  # what the adapter's _close does for a predicted stop
    asm.close_step(t0, {"A": [2]})  # 2 = EOS
    asm.close_step(t1, {"A": [77]})
    assert inputs(asm.publisher.offered[1]) == {"A": [2]}
    assert [r.sampled_token_ids for r in asm.publisher.offered[1].requests] == [[]]
    assert not asm.knows("A")


def test_output_tokens_include_this_steps_sample_before_close() -> None:
    """What the adapter's stop rules read (repetition needs the whole output): the tokens
    generated so far plus this step's, while the step is still open; a re-run after
    preemption reads what was fed, not what was sampled beyond it."""
    asm = StepAssembler(FakePublisher())
    run_step(asm, [sched("B", 0, 3, PROMPT_B)], {"B": [40]})
    run_step(asm, [sched("B", 3, 1, PROMPT_B)], {"B": [41]})
    decode = sched("B", 4, 1, PROMPT_B)
    step = asm.open_step(rows_for([decode]), [decode], [])
    assert asm.output_tokens(decode, [42]) == [40, 41, 42]
    asm.close_step(step, {"B": [42]})
    rerun = sched("B", 0, 5, PROMPT_B)  # recomputed from scratch after a preemption
    assert asm.output_tokens(rerun, [42]) == [40, 41, 42]


def test_a_long_client_id_goes_out_bounded_and_its_step_mates_intact(asm: StepAssembler) -> None:
    """vLLM takes X-Request-Ids of any length (issue 23 sent 600 characters); the channel
    carries 512. The hook sends the bounded form (detector.channel.ids), in the step's
    requests and in its finished list, so the step passes validation whole."""
    long_id = f"chatcmpl-{'x' * 600}-deadbeef"
    odd_id = "cmpl-caf\u00c3\u00a9\n-0-1a2b3c4d"
    steps = [run_step(asm, [sched(long_id, 0, 3, PROMPT_B), sched("B", 0, 3, PROMPT_B),
                            sched(odd_id, 0, 3, PROMPT_B)],
                      {long_id: [40], "B": [41], odd_id: [42]}),
             run_step(asm, [sched(long_id, 3, 1, PROMPT_B), sched("B", 3, 1, PROMPT_B)],
                      {long_id: [43], "B": [44]}, finished=(long_id, odd_id))]
    for step in steps:
        header = as_message(step)
        assert not header.refused
        assert header.requests[1].req_id == "B"
    sent = [r.req_id for r in steps[0].requests]
    assert sent == [bounded_engine_id(long_id), "B", bounded_engine_id(odd_id)]
    assert all(len(i) <= 512 and i.isprintable() and i.isascii() for i in sent)
    assert steps[1].finished == [bounded_engine_id(long_id), bounded_engine_id(odd_id)]
    assert inputs(steps[1])[bounded_engine_id(long_id)] == [40]
