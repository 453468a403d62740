"""Out-of-order, duplicated and contradictory steps through the real scoring pipeline.

ZeroMQ delivers one engine's messages in order, so these orders only come from a broken or
hostile peer, or from two engines on one channel. Whatever arrives, the sidecar must never
attribute a row to the wrong token: a replayed step adds nothing, an old step never rewrites
newer state (nor revives a finished request), and a request either ends FINISHED with
exactly the reference scores or is marked incomplete with a reason, its scores still right.
(test_streams.py covers gaps, restarts, preemption and byte accounting of in-order steps.)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_engine import MODEL, PROMPTS, engine, make_step, probe, row_value, schedule

from detector.sidecar.analysis import Analyzer
from detector.sidecar.metrics import SidecarMetrics
from detector.sidecar.pipeline import ScoringPipeline
from detector.sidecar.registry import ProbeRegistry
from detector.sidecar.store import RequestStore

class Harness:
    """The sidecar's pipeline, registry and store, minus the socket."""

    def __init__(self) -> None:
        self.subscriber = SimpleNamespace(rejected=0, rejected_connections=0,
                                          without_engine_info=0)
        self.registry = ProbeRegistry(served=MODEL, device=torch.device("cpu"))
        self.store = RequestStore()
        self.registry.on_change.append(self.store.set_columns)
        self.metrics = SidecarMetrics()
        self.pipeline = ScoringPipeline(self.subscriber, self.registry, self.store,
                                        self.metrics, Analyzer(None))
        for art, name in ((probe("prod", [1, 3], "producer", 1), "prod"),
                          (probe("own", [3], "own", 2), "own")):
            path = art.save(Path(tempfile.mkdtemp(prefix="ld-probe-")) / name)
            self.registry.load(path)

    def feed(self, messages) -> None:
        for message in messages:
            self.pipeline.handle(message)

    def result(self, req_id: str) -> tuple:
        rec, tokens = self.store.snapshot(req_id)
        return rec, [(t.position, t.token_id, dict(t.scores)) for t in tokens]

    def rejected(self) -> float:
        self.pipeline._housekeeping()
        return self.metrics.messages_rejected._value.get()


@pytest.fixture
def reference() -> dict:
    h = Harness()
    h.feed(schedule())
    out = {r: h.result(r) for r in PROMPTS}
    for rec, tokens in out.values():
        assert rec.finished and rec.incomplete is None
        assert all("prod" in s for _, _, s in tokens)
        assert all("own" in s for _, _, s in tokens[:-1])
    out["bytes"] = h.store.stats().bytes
    return out


def assert_never_misattributed(got: list, expected: list) -> None:
    """Same tokens at the same positions (or -1: never seen); any score present is the
    reference score for that position."""
    ref = {pos: (tok, scores) for pos, tok, scores in expected}
    for pos, tok, scores in got:
        ref_tok, ref_scores = ref[pos]
        assert tok in (ref_tok, -1), f"position {pos}: token {tok}, expected {ref_tok}"
        for name, p in scores.items():
            assert p == pytest.approx(ref_scores[name], abs=1e-6), (pos, name)


def test_every_step_delivered_twice_changes_nothing(reference: dict) -> None:
    h = Harness()
    for message in schedule():
        h.feed([message, message])
    for req_id in PROMPTS:
        rec, tokens = h.result(req_id)
        assert tokens == reference[req_id][1]
        assert rec.finished and rec.incomplete is None
    assert h.store.stats().bytes == reference["bytes"]  # a replayed row is not stored twice
    assert h.store.stats().incomplete == 0
    assert h.rejected() == len(schedule())  # each replay is refused and counted


def test_an_old_step_replayed_after_the_end_does_not_revive_or_rewrite(reference: dict,
                                                                       caplog) -> None:
    h = Harness()
    steps = schedule()
    h.feed(steps)
    with caplog.at_level(logging.WARNING):
        h.feed([steps[0], steps[2], steps[-2]])  # prefill, decode and the step before the end
    for req_id in PROMPTS:
        rec, tokens = h.result(req_id)
        assert rec.finished, f"{req_id} was revived by a stale step"
        assert rec.incomplete is None
        assert tokens == reference[req_id][1]
    assert h.rejected() == 3
    assert "stale" in caplog.text or "out of order" in caplog.text


@pytest.mark.parametrize("swap", [1, 2, 4])
def test_swapped_steps_never_misattribute(reference: dict, swap: int) -> None:
    """Step ``swap + 1`` arrives before step ``swap``: a gap at the time, then a stale step."""
    steps = schedule()
    order = steps[:swap] + [steps[swap + 1], steps[swap]] + steps[swap + 2:]
    h = Harness()
    h.feed(order)
    for req_id in PROMPTS:
        rec, tokens = h.result(req_id)
        assert_never_misattributed(tokens, reference[req_id][1])
        complete = tokens == reference[req_id][1]
        # Either every score is there and right, or the request says it is incomplete.
        assert complete or rec.incomplete, (req_id, rec.incomplete)
        assert [t for _, t, _ in tokens if t != -1] == \
            [t for _, t, _ in reference[req_id][1] if t in [x for _, x, _ in tokens]]


def test_random_orders_and_duplicates_never_misattribute(reference: dict) -> None:
    rng = np.random.default_rng(7)
    steps = schedule()
    for _ in range(60):
        order = []
        for i, s in enumerate(steps):
            order.append(s)
            if rng.random() < 0.3:  # replay some earlier step
                order.append(steps[int(rng.integers(0, i + 1))])
        if rng.random() < 0.5:  # and swap a neighbouring pair
            i = int(rng.integers(0, len(order) - 1))
            order[i], order[i + 1] = order[i + 1], order[i]
        h = Harness()
        h.feed(order)
        for req_id in PROMPTS:
            rec, tokens = h.result(req_id)
            assert_never_misattributed(tokens, reference[req_id][1])
            if tokens != reference[req_id][1]:
                assert rec.incomplete, f"{req_id}: scores differ but not marked incomplete"


def test_engine_layout_changing_under_the_same_id_is_scored_with_the_new_layout() -> None:
    """A message's rows are always read with the layers its own header declares."""
    h = Harness()
    h.feed(schedule()[:2])
    moved = engine(layers=(2, 3))  # same engine id, another layer set of the same size
    step = make_step(2, [("A", 5, 1, True)], [], moved)
    h.feed([step])
    rec, tokens = h.result("A")
    token = next(t for t in tokens if t[0] == 6)  # scored from the row at position 5
    # "prod" reads layer 1, which this step did not capture: no score rather than a wrong one.
    assert "prod" not in token[2]
    inactive = {p.artifact.metadata.name: p.inactive_reason for p in h.registry.probes()}
    assert "prod" in inactive and inactive["prod"]
    # "own" reads layer 3, present in both layouts: its score uses layer 3's row.
    own = probe("own", [3], "own", 2)
    w = own.weight
    expected = torch.sigmoid(row_value("A", 3, 5) @ w).item()
    token5 = next(t for t in tokens if t[0] == 5)
    assert token5[2]["own"] == pytest.approx(expected, abs=1e-5)


def test_two_engines_interleaved_on_one_channel_never_mix_rows() -> None:
    """Two engines on one channel (a misconfiguration): requests may be marked incomplete,
    but each keeps only its own engine's tokens and right scores."""
    e1, e2 = engine("e1"), engine("e2")
    one = schedule(e1)
    ref = Harness()
    ref.feed(one)
    expected = {r: ref.result(r)[1] for r in PROMPTS}
    h = Harness()
    # e2 serves other requests (same prompts, other ids).
    two = []
    for message in schedule(e2):
        header, rows = message
        renamed = header.model_copy(update={
            "requests": [r.model_copy(update={"req_id": "x" + r.req_id}) for r in header.requests],
            "finished": ["x" + f for f in header.finished]})
        two.append((renamed, rows))
    for a, b in zip(one, two):
        h.feed([a, b])
    for req_id in PROMPTS:
        rec, tokens = h.result(req_id)
        assert rec.engine_id == "e1"
        assert_never_misattributed(tokens, expected[req_id])
        rec2, tokens2 = h.result("x" + req_id)
        assert rec2.engine_id == "e2"
        assert_never_misattributed(tokens2, expected[req_id])


def test_probes_stay_inactive_until_an_engine_is_heard_from() -> None:
    """Before the hook's first message nothing can be scored: ListProbes must say so, or a
    client that waits for active probes starts requests whose steps are still dropped."""
    from detector.sidecar.registry import NO_ENGINE_YET

    h = Harness()
    assert {p.inactive_reason for p in h.registry.probes()} == {NO_ENGINE_YET}
    assert h.registry.active() is None
    h.feed(schedule()[:1])
    assert [p.inactive_reason for p in h.registry.probes()] == ["", ""]
    assert h.registry.active().columns.names == ("prod", "own")
