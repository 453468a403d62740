"""RequestStore: tokens and scores per request, bounded; aliases; which rows are worth scoring."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from detector.channel.ids import (
    MAX_ID_CHARS,
    bounded,
    bounded_engine_id,
    client_ids,
    request_aliases,
)
from detector.channel.wire import EngineInfo, RefusedRows, RequestRows, StepHeader
from detector.sidecar import store as store_module
from detector.sidecar.scores import columns_for, rows_to_score
from detector.sidecar.store import RequestStore

COLUMNS = columns_for(["prod", "own"], ["producer", "own"], [0.5, 0.5])


def engine(engine_id: str = "e1") -> EngineInfo:
    return EngineInfo(
        engine_id=engine_id, model="tiny", hidden_size=4, num_layers=6, layers=[1, 3],
        dtype="float32", capture_method="forward_hook", pid=1, started_at=0.0,
    )


def rr(req_id: str, first: int, inputs: list[int], num_prompt: int,
       sampled: list[int] | None = None) -> dict:
    return dict(req_id=req_id, first_position=first, input_token_ids=inputs,
                num_prompt_tokens=num_prompt, sampled_token_ids=sampled or [])


def header(seq: int, reqs: list[dict], finished: list[str] | None = None, *,
           engine_id: str = "e1", construct: bool = False) -> StepHeader:
    """A step with row offsets laid out in order; validated unless ``construct``."""
    requests, offset = [], 0
    for r in reqs:
        n = len(r["input_token_ids"])
        fields = dict(row_offset=offset, num_rows=n, **r)
        requests.append(RequestRows.model_construct(**fields) if construct
                        else RequestRows(**fields))
        offset += n
    fields = dict(kind="step", version=2, engine_id=engine_id, engine=engine(engine_id), seq=seq,
                  time_ns=1000 + seq,
                  num_rows=offset, requests=requests, finished=finished or [], hook_ns=0,
                  dropped_total=0)
    return StepHeader.model_construct(**fields) if construct else StepHeader(**fields)


def position_probs(h: StepHeader) -> tuple[np.ndarray, np.ndarray]:
    """Score the rows worth scoring with recognisable values: prod = pos/100, own = pos/100+.5."""
    index = rows_to_score(h)
    pos = {}
    for r in h.requests:
        for j in range(r.num_rows):
            pos[r.row_offset + j] = r.first_position + j
    probs = np.array([[pos[int(i)] / 100, pos[int(i)] / 100 + 0.5] for i in index],
                     dtype=np.float32).reshape(len(index), 2)
    return index, probs


def ingest(store: RequestStore, h: StepHeader, *, scored: bool = True) -> None:
    if scored:
        index, probs = position_probs(h)
        store.ingest(h, index, probs, COLUMNS)
    else:
        store.ingest(h, np.empty(0, dtype=np.int64), None, None)


PROMPT = [1, 2, 3, 4]


def feed_request(store: RequestStore, req_id: str, seq0: int, *, tokens=(50, 51, 52),
                 finish: bool = True, construct: bool = False) -> int:
    """Prefill then decode, one step per token; returns the next seq."""
    seq = seq0
    ingest(store, header(seq, [rr(req_id, 0, PROMPT, 4, [tokens[0]])], construct=construct))
    for k in range(1, len(tokens)):
        seq += 1
        last = k == len(tokens) - 1
        ingest(store, header(seq, [rr(req_id, 3 + k, [tokens[k - 1]], 4, [tokens[k]])],
                             [req_id] if (finish and last) else [], construct=construct))
    return seq + 1


# ------------------------------------------------------------------ aliases
def test_aliases_for_completion_prompt_zero() -> None:
    assert request_aliases("cmpl-abc-0-1a2b3c4d") == [
        "cmpl-abc-0-1a2b3c4d", "cmpl-abc-0", "cmpl-abc", "abc"]


def test_aliases_for_completion_prompt_one_have_no_bare_response_id() -> None:
    aliases = request_aliases("cmpl-abc-1-1a2b3c4d")
    assert aliases[:2] == ["cmpl-abc-1-1a2b3c4d", "cmpl-abc-1"]
    assert "cmpl-abc" not in aliases
    assert "abc" not in aliases  # the client's X-Request-Id names prompt 0's result


def test_aliases_for_chat_completion() -> None:
    assert request_aliases("chatcmpl-xyz-deadbeef") == [
        "chatcmpl-xyz-deadbeef", "chatcmpl-xyz", "xyz"]


def test_aliases_of_an_unknown_shape_are_just_the_id() -> None:
    assert request_aliases("plain") == ["plain"]
    assert request_aliases("cmpl-abc-0-NOTHEX12")[0] == "cmpl-abc-0-NOTHEX12"


def test_aliases_resolve_in_the_store() -> None:
    store = RequestStore()
    feed_request(store, "cmpl-abc-0-1a2b3c4d", 0)
    feed_request(store, "cmpl-abc-1-1a2b3c4d", 3)
    feed_request(store, "chatcmpl-xyz-deadbeef", 6)
    assert store.resolve("abc") == "cmpl-abc-0-1a2b3c4d"
    assert store.resolve("cmpl-abc") == "cmpl-abc-0-1a2b3c4d"
    assert store.resolve("cmpl-abc-1") == "cmpl-abc-1-1a2b3c4d"
    assert store.resolve("xyz") == "chatcmpl-xyz-deadbeef"
    assert store.resolve("chatcmpl-xyz") == "chatcmpl-xyz-deadbeef"
    assert store.resolve("nope") is None
    rec, _ = store.snapshot("xyz")
    assert rec.req_id == "chatcmpl-xyz-deadbeef"


# ------------------------------------------------------------------ ids clients chose
# X-Request-Ids vLLM takes (headers up to 4 MB, read as latin-1) that the channel cannot carry
# as they are: issue 23 sent 600 characters and every step holding the request was refused.
HOSTILE_IDS = ["", "a", "x" * 513, "y" * 600, "z" * 65536, "r\u00e9q\u00eate \u00e0 moi",
               "caf\u00e9".encode().decode("latin-1"), "tab\there", "a\nb", "\u20ac" * 300]
TAG = "~ld0123456789abcdef"


@pytest.mark.parametrize("x", HOSTILE_IDS, ids=lambda x: f"{len(x)}-chars")
@pytest.mark.parametrize("tag", ["", TAG])
def test_any_client_id_travels_bounded_and_is_found_by_every_name(x: str, tag: str) -> None:
    store = RequestStore()
    engine_ids = {"completions": f"cmpl-{x}{tag}-0-1a2b3c4d", "chat": f"chatcmpl-{x}{tag}-deadbeef"}
    seq = 0
    sent = {}
    for api, engine_id in engine_ids.items():
        wire_id = bounded_engine_id(engine_id)
        assert len(wire_id) <= MAX_ID_CHARS and wire_id.isascii() and wire_id.isprintable()
        assert bounded_engine_id(wire_id) == wire_id  # a bounded id stays as it is
        if len(x) <= 200 and x.isascii() and x.isprintable():
            assert wire_id == engine_id  # plain ids travel unchanged
        else:  # a recognisable prefix, then the digest
            assert wire_id.startswith(engine_id[:len("cmpl-")]) and "~h" in wire_id
        seq = feed_request(store, wire_id, seq)
        sent[api] = wire_id
    completion, chat = sent["completions"], sent["chat"]
    xt = x + tag
    for asked, want in [(engine_ids["completions"], completion), (f"cmpl-{xt}-0", completion),
                        (f"cmpl-{xt}", completion), (engine_ids["chat"], chat),
                        (f"chatcmpl-{xt}", chat)]:
        assert store.resolve(asked) == want, asked[:40]
        if tag and asked not in engine_ids.values():
            # The client's own ids (it never sees the middleware's tag) find it too.
            assert store.resolve(asked.replace(tag, "")) == want, asked[:40]
    for asked in {xt, x}:  # the X-Request-Id: the newest of the two (an empty one is no id)
        if asked:
            assert store.resolve(asked) == chat


def test_long_ids_with_one_prefix_stay_apart() -> None:
    a, b = "p" * 600 + "1", "p" * 600 + "2"
    assert bounded(a) != bounded(b)
    assert bounded(a).startswith("p" * 48 + "~h") and len(bounded(a)) == 48 + 2 + 32
    store = RequestStore()
    seq = feed_request(store, bounded_engine_id(f"chatcmpl-{a}-deadbeef"), 0, tokens=(1, 2))
    feed_request(store, bounded_engine_id(f"chatcmpl-{b}-deadbeef"), seq, tokens=(3, 4))
    assert store.snapshot(a)[0].generated == [1, 2]
    assert store.snapshot(b)[0].generated == [3, 4]


def test_a_utf8_id_is_found_as_vllm_read_its_bytes() -> None:
    """vLLM reads header bytes as latin-1; a client asks by the text it sent (UTF-8)."""
    meant = "r\u00e9q-\u20ac"
    engine_id = bounded_engine_id(f"chatcmpl-{meant.encode().decode('latin-1')}-deadbeef")
    store = RequestStore()
    feed_request(store, engine_id, 0)
    assert store.resolve(meant) == store.resolve(f"chatcmpl-{meant}") == engine_id


def test_client_ids_leave_the_middleware_tag_out() -> None:
    ids = client_ids(f"cmpl-abc{TAG}-0-1a2b3c4d")
    assert (ids.response_id, ids.x_request_id, ids.prompt_index) == ("cmpl-abc", "abc", 0)
    ids = client_ids(f"chatcmpl-abc{TAG}-deadbeef")
    assert (ids.response_id, ids.x_request_id) == ("chatcmpl-abc", "abc")


def test_requests_running_under_one_id_are_counted() -> None:
    """resolve_shared says how many requests an id names and how many of them run: the
    service refuses to pick one of several running (a reused X-Request-Id)."""
    store = RequestStore()
    seq = feed_request(store, "cmpl-abc-0-aaaaaaaa", 0, finish=False)
    assert store.resolve_shared("abc") == ("cmpl-abc-0-aaaaaaaa", 1, 1)
    seq = feed_request(store, "cmpl-abc-0-bbbbbbbb", seq, finish=False)
    assert store.resolve_shared("abc") == ("cmpl-abc-0-bbbbbbbb", 2, 2)
    assert store.resolve_shared("cmpl-abc-0-aaaaaaaa") == ("cmpl-abc-0-aaaaaaaa", 1, 1)
    ingest(store, header(seq, [], ["cmpl-abc-0-aaaaaaaa"]))
    assert store.resolve_shared("abc") == ("cmpl-abc-0-bbbbbbbb", 2, 1)


def test_a_refused_share_makes_its_request_incomplete_and_no_other() -> None:
    store = RequestStore()
    seq = feed_request(store, "A", 0, finish=False)
    seq = feed_request(store, "B", seq, finish=False)
    step = header(seq, [rr("B", 6, [52], 4, [53])])
    step.refused = [RefusedRows(req_id="A", row_offset=1, num_rows=1, reason="req_id: bad"),
                    RefusedRows(req_id=None, row_offset=2, num_rows=1, reason="req_id: long")]
    ingest(store, step)
    assert "refused" in store.snapshot("A")[0].incomplete
    assert store.snapshot("B")[0].incomplete is None
    assert store.snapshot("B")[0].generated == [50, 51, 52, 53]
    assert store.refused_rows == 2
    # A request the engine ended is settled: a refused share naming it changes nothing.
    feed_request(store, "C", seq + 1)
    ended = header(seq + 10, [])
    ended.refused = [RefusedRows(req_id="C", row_offset=0, num_rows=0, reason="forged")]
    ingest(store, ended)
    assert store.snapshot("C")[0].incomplete is None


# ------------------------------------------------------------------ ingest
@pytest.mark.parametrize("construct", [False, True])
def test_tokens_and_scores_resolve_per_position(construct: bool) -> None:
    store = RequestStore()
    store.set_columns(COLUMNS)
    feed_request(store, "A", 0, construct=construct)
    rec, scores = store.snapshot("A")
    assert rec.generated == [50, 51, 52]
    assert rec.finished
    assert rec.incomplete is None
    assert [s.position for s in scores] == [4, 5, 6]
    assert [s.token_id for s in scores] == [50, 51, 52]
    # Producer: token at q is scored from row q-1 (the last prompt row for the first token).
    assert [s.scores["prod"] for s in scores] == pytest.approx([0.03, 0.04, 0.05])
    # Own position: row q, one step later; the final token is never fed back, so unscored.
    assert scores[0].scores["own"] == pytest.approx(0.54)
    assert scores[1].scores["own"] == pytest.approx(0.55)
    assert "own" not in scores[2].scores
    # Settled: every row the probes read has arrived (never, for the final token's own row).
    assert [s.settled for s in scores] == [True, True, False]
    # Each token carries the time of the step that sampled it.
    assert [s.generated_ns for s in scores] == [1000, 1001, 1002]
    assert rec.prompt_tail == PROMPT


def test_scores_use_the_columns_a_row_was_scored_with() -> None:
    store = RequestStore()
    store.set_columns(columns_for(["own", "prod", "new"], ["own", "producer", "producer"],
                                  [0.5] * 3))
    feed_request(store, "A", 0)
    _, scores = store.snapshot("A")
    assert scores[0].scores == pytest.approx({"prod": 0.03, "own": 0.54})  # no "new"


def test_unscored_steps_still_give_tokens() -> None:
    store = RequestStore()
    store.set_columns(COLUMNS)
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50])]), scored=False)
    ingest(store, header(1, [rr("A", 4, [50], 4, [51])]))
    _, scores = store.snapshot("A")
    assert [s.token_id for s in scores] == [50, 51]
    assert "prod" not in scores[0].scores  # its producer row (3) was never scored
    assert scores[0].scores["own"] == pytest.approx(0.54)
    assert scores[1].scores["prod"] == pytest.approx(0.04)


def test_chunked_prefill_then_decode_in_a_batch() -> None:
    store = RequestStore()
    store.set_columns(COLUMNS)
    long_prompt = list(range(100, 110))
    h0 = header(0, [rr("A", 0, PROMPT, 4, [50]), rr("B", 0, long_prompt[:6], 10)])
    h1 = header(1, [rr("B", 6, long_prompt[6:], 10, [70]), rr("A", 4, [50], 4, [51])])
    h2 = header(2, [rr("A", 5, [51], 4, [52]), rr("B", 10, [70], 10, [71])], ["A"])
    for h in (h0, h1, h2):
        ingest(store, h)
    a, a_scores = store.snapshot("A")
    b, b_scores = store.snapshot("B")
    assert a.generated == [50, 51, 52] and a.finished
    assert b.generated == [70, 71] and not b.finished
    assert b_scores[0].scores["prod"] == pytest.approx(0.09)  # row of B's last prompt token
    assert b_scores[0].scores["own"] == pytest.approx(0.60)
    assert a_scores[2].scores["prod"] == pytest.approx(0.05)


def test_preempted_recompute_keeps_tokens_and_scores() -> None:
    store = RequestStore()
    store.set_columns(COLUMNS)
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50])]))
    ingest(store, header(1, [rr("A", 4, [50], 4, [51])]))
    ingest(store, header(2, [rr("A", 0, PROMPT + [50, 51], 4, [52])]))  # recomputed from 0
    ingest(store, header(3, [rr("A", 6, [52], 4, [53])], ["A"]))
    rec, scores = store.snapshot("A")
    assert rec.generated == [50, 51, 52, 53]
    assert rec.incomplete is None
    assert [s.scores["prod"] for s in scores] == pytest.approx([0.03, 0.04, 0.05, 0.06])


def test_capture_starting_mid_request_is_incomplete() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 7, [55], 4, [56])]))
    rec, _ = store.snapshot("A")
    assert rec.incomplete and "after the request began" in rec.incomplete
    assert store.stats().incomplete == 1


def test_missing_tokens_leave_a_marked_gap() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50])]))
    ingest(store, header(1, [rr("A", 6, [52], 4, [53])]))  # rows for 4,5 never came
    rec, _ = store.snapshot("A")
    assert rec.generated == [50, -1, 52, 53]
    assert rec.incomplete == "some tokens were never received"


def contiguous_steps(n: int) -> list[StepHeader]:
    """Prefill sampling token 50, then decode steps; step k samples 50 + k."""
    steps = [header(0, [rr("A", 0, PROMPT, 4, [50])])]
    for k in range(1, n):
        steps.append(header(k, [rr("A", 3 + k, [50 + k - 1], 4, [50 + k])]))
    return steps


@pytest.mark.parametrize("skipped", [(2,), (2, 3), (2, 3, 4, 5), (1, 2, 3, 4), (3, 4, 5)])
def test_byte_accounting_is_not_changed_by_a_gap(skipped: tuple[int, ...]) -> None:
    contiguous, gapped = RequestStore(), RequestStore()
    for seq, h in enumerate(contiguous_steps(8)):
        ingest(contiguous, h, scored=False)
        if seq not in skipped:
            ingest(gapped, h, scored=False)
    g = gapped.snapshot("A")[0]
    c = contiguous.snapshot("A")[0]
    assert len(g.generated) == len(c.generated) == 8
    assert len(g.generated_ns) == len(c.generated_ns) == 8
    assert g.incomplete is not None and c.incomplete is None
    assert (-1 in g.generated) == (len(skipped) > 1)  # one dropped step loses no token id
    # Both hold as many token ids and times, and no rows: the same memory.
    assert gapped.stats().bytes == contiguous.stats().bytes


def test_byte_accounting_of_a_rescored_row_counts_it_once() -> None:
    once, twice = RequestStore(), RequestStore()
    steps = [header(0, [rr("A", 0, PROMPT, 4, [50])]), header(1, [rr("A", 4, [50], 4, [51])])]
    for h in steps:
        ingest(once, h)
        ingest(twice, h)
    # A recompute after preemption scores rows 3 and 4 again: same rows, same memory.
    ingest(twice, header(2, [rr("A", 0, PROMPT + [50], 4, [51])]))
    assert twice.snapshot("A")[0].generated == once.snapshot("A")[0].generated
    assert twice.stats().bytes == once.stats().bytes


# ------------------------------------------------------------------ gaps and restarts
def test_seq_gap_marks_running_requests_incomplete_not_finished_ones() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50]), rr("B", 0, PROMPT, 4, [60])]))
    ingest(store, header(1, [rr("A", 4, [50], 4, [51]), rr("B", 4, [60], 4, [61])], ["A"]))
    ingest(store, header(2, [rr("B", 5, [61], 4, [62])]))
    assert store.snapshot("B")[0].incomplete is None
    ingest(store, header(5, [rr("B", 8, [65], 4, [66])]))  # seqs 3 and 4 were dropped
    a, _ = store.snapshot("A")
    b, _ = store.snapshot("B")
    assert a.finished and a.incomplete is None
    assert b.incomplete == "the channel dropped steps"
    assert store.stats().incomplete == 1


def test_consecutive_seqs_mark_nothing() -> None:
    store = RequestStore()
    feed_request(store, "A", 0, tokens=(50, 51, 52, 53, 54), finish=False)
    assert store.snapshot("A")[0].incomplete is None
    assert store.stats().incomplete == 0


def test_heartbeat_seq_gap_marks_running_requests() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50])]))
    store.note_engine("e1", next_seq=1)  # nothing missing
    assert store.snapshot("A")[0].incomplete is None
    store.note_engine("e1", next_seq=3)  # seqs 1 and 2 never arrived
    assert store.snapshot("A")[0].incomplete == "the channel dropped steps"
    ingest(store, header(3, [rr("B", 0, PROMPT, 4, [60])]))  # the gap is not counted twice
    assert store.snapshot("B")[0].incomplete is None
    assert store.stats().incomplete == 1


def test_engine_restart_marks_running_requests_incomplete() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50]), rr("B", 0, PROMPT, 4, [60])]))
    ingest(store, header(1, [rr("B", 4, [60], 4, [61])], ["A"]))
    ingest(store, header(0, [rr("C", 0, PROMPT, 4, [70])], engine_id="e2"))  # new engine, seq 0
    a, _ = store.snapshot("A")
    b, _ = store.snapshot("B")
    c, _ = store.snapshot("C")
    assert a.incomplete is None
    assert b.incomplete == "the vLLM engine restarted"
    assert c.incomplete is None and c.engine_id == "e2"


def test_engine_restart_seen_in_a_heartbeat() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50])]))
    store.note_engine("e2", next_seq=0)
    assert store.snapshot("A")[0].incomplete == "the vLLM engine restarted"


# ------------------------------------------------------------------ bounds
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(store_module, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def test_ttl_expiry(clock: FakeClock) -> None:
    store = RequestStore(finished_ttl_s=10, idle_ttl_s=100)
    feed_request(store, "cmpl-done-0-1a2b3c4d", 0)                  # finished
    feed_request(store, "run", 3, finish=False)                    # running
    clock.now += 11
    store.expire()
    assert store.resolve("cmpl-done-0-1a2b3c4d") is None
    assert store.resolve("done") is None  # aliases go with the record
    assert store.resolve("run") == "run"
    assert store.stats().expired == 1
    clock.now += 90  # 101 s idle
    store.expire()
    assert store.request_ids() == []
    assert store.stats().expired == 2
    assert store.stats().bytes == 0


def test_activity_postpones_expiry(clock: FakeClock) -> None:
    store = RequestStore(finished_ttl_s=10, idle_ttl_s=100)
    ingest(store, header(0, [rr("run", 0, PROMPT, 4, [50])]))
    clock.now += 90
    ingest(store, header(1, [rr("run", 4, [50], 4, [51])]))
    clock.now += 90
    store.expire()
    assert store.resolve("run") == "run"


def test_max_requests_evicts_finished_first() -> None:
    store = RequestStore(max_requests=2)
    ingest(store, header(0, [rr("old-running", 0, PROMPT, 4, [50])]))
    feed_request(store, "cmpl-fin-0-1a2b3c4d", 1)
    seq = 4
    ingest(store, header(seq, [rr("new", 0, PROMPT, 4, [60])]))
    assert sorted(store.request_ids()) == ["new", "old-running"]
    assert store.resolve("fin") is None
    assert store.stats().evicted == 1
    # With nothing finished, the least recently updated goes.
    ingest(store, header(seq + 1, [rr("old-running", 4, [50], 4, [51])]))
    ingest(store, header(seq + 2, [rr("newest", 0, PROMPT, 4, [70])]))
    assert sorted(store.request_ids()) == ["newest", "old-running"]
    assert store.stats().evicted == 2


def test_max_bytes_evicts_finished_first_and_holds_the_bound() -> None:
    probe = RequestStore()
    feed_request(probe, "x", 0)
    one = probe.stats().bytes
    assert one > 0
    store = RequestStore(max_bytes=int(2.5 * one))
    feed_request(store, "f1", 0)
    feed_request(store, "r1", 3, finish=False)
    assert store.stats().bytes <= store.max_bytes
    feed_request(store, "r2", 6, finish=False)
    assert sorted(store.request_ids()) == ["r1", "r2"]  # f1 was finished: it went first
    assert store.stats().evicted >= 1
    feed_request(store, "r3", 9, finish=False)
    assert "r3" in store.request_ids() and "r1" not in store.request_ids()
    stats = store.stats()
    assert stats.bytes <= store.max_bytes
    assert stats.bytes == sum(store._records[k].nbytes for k in store.request_ids())


# ------------------------------------------------------------------ waiting
def test_wait_wakes_on_ingest() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("cmpl-w-0-1a2b3c4d", 0, PROMPT, 4, [50])]))
    version = store.snapshot("w")[0].version

    def later() -> None:
        time.sleep(0.1)
        ingest(store, header(1, [rr("cmpl-w-0-1a2b3c4d", 4, [50], 4, [51])]))

    t = threading.Thread(target=later)
    t0 = time.monotonic()
    t.start()
    try:
        assert store.wait("w", after_version=version, timeout_s=5.0) is True
        elapsed = time.monotonic() - t0
    finally:
        t.join()
    assert 0.05 <= elapsed < 1.0  # woken by the ingest, not by polling or the timeout
    assert store.snapshot("w")[0].generated == [50, 51]


def test_wait_times_out_without_news() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50])]))
    version = store.snapshot("A")[0].version
    t0 = time.monotonic()
    assert store.wait("A", after_version=version, timeout_s=0.15) is False
    assert 0.12 <= time.monotonic() - t0 < 1.0
    assert store.wait("missing", timeout_s=0.05) is False
    assert store.wait("A", after_version=version - 1, timeout_s=0.05) is True  # already newer


def test_wait_until_finished() -> None:
    store = RequestStore()
    ingest(store, header(0, [rr("A", 0, PROMPT, 4, [50])]))
    done = []

    def waiter() -> None:
        done.append(store.wait("A", until_finished=True, timeout_s=5.0))

    t = threading.Thread(target=waiter)
    t.start()
    ingest(store, header(1, [rr("A", 4, [50], 4, [51])]))  # news, but not the end
    time.sleep(0.05)
    assert done == []
    ingest(store, header(2, [rr("A", 5, [51], 4, [52])], ["A"]))
    t.join(timeout=2)
    assert done == [True]


# ------------------------------------------------------------------ rows_to_score
def test_rows_to_score_skips_prompt_rows_before_the_last() -> None:
    h = header(0, [
        rr("A", 0, list(range(10)), 10, [5]),      # whole prompt: only its last row (offset 9)
        rr("B", 7, [1], 5, [2]),                   # decode: its row (offset 10)
        rr("C", 0, list(range(6)), 12),            # first chunk of 12: nothing
        rr("D", 6, list(range(6)), 12, [9]),       # last chunk of 12: row of position 11 (22)
        rr("E", 4, list(range(4)), 9),             # middle chunk ending at 7 of 9: nothing
        rr("F", 8, [1, 2], 9, [3]),                # chunk 8..9 of a 9-token prompt: pos 8, 9
    ])
    assert rows_to_score(h).tolist() == [9, 10, 22, 27, 28]


def test_rows_to_score_across_chunked_prefill() -> None:
    prompt = list(range(20))
    chunks = [(0, 8), (8, 8), (16, 4)]
    scored_positions = []
    for seq, (first, n) in enumerate(chunks):
        h = header(seq, [rr("A", first, prompt[first:first + n], 20)])
        scored_positions += [first + int(i) for i in rows_to_score(h)]
    assert scored_positions == [19]


def test_rows_to_score_of_a_recompute_keeps_generated_rows() -> None:
    h = header(0, [rr("X", 0, [7], 1, [8]), rr("A", 0, PROMPT + [50, 51], 4, [52])])
    assert rows_to_score(h).tolist() == [0, 1 + 3, 1 + 4, 1 + 5]


def test_rows_to_score_of_an_empty_step() -> None:
    index = rows_to_score(header(0, []))
    assert index.size == 0 and index.dtype.kind == "i"
