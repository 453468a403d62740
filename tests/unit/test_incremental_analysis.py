"""The incremental analysis (detector.sidecar.incremental) equals the from-scratch one, and
one step's work does not grow with the answer.

Tokens arrive in random batches through the real store (re-scored rows, stop strings,
probes scored from the producing row and from the token's own row, a verdict model that
reads log-probabilities); after each batch both views are read incrementally and compared
field by field with ``Analyzer.analyse`` of a fresh snapshot.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from detector.channel.wire import EngineInfo, RequestRows, StepHeader, StopRule
from detector.claims import ClaimCutter, SentenceCutter, find_claims, sentences
from detector.sidecar.analysis import Analyzer
from detector.sidecar.views import RequestAnalysis
from detector.sidecar.incremental import StreamCursor
from detector.sidecar.scores import columns_for, rows_to_score
from detector.sidecar.store import RequestStore
from detector.sidecar.text import TextDecoder
from detector.verdict import OperatingPoint, VerdictModel

PIECES = [" Paris", ".", " ", "\n", "The", " of", " 1", ",", "000", " July", " 4", "-", "D.C",
          "?", "!", " is", " the", " euro", "'s", " U.S.", " Rio", " de", " Janeiro", "3.14",
          " France", " capital", " and", " New", " York", " he", "He", " 1776", " St", ". ",
          ",0", "00", "  ", " - ", " Mt", " a", "A:", " Ulaanbaatar", " currency", "’", "é",
          " München", " 42", "nd", " Dr", " Smith", "\n\n", " was", " called"]
PROMPTS = ["", "What is the capital of France?", "Q: Who was born in 1776 in New York?\nA:"]


@pytest.mark.parametrize("seed", range(40))
def test_claim_and_sentence_cutters_equal_cutting_from_scratch(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 80)))
        prompt = rng.choice(PROMPTS)
        claims, cut = ClaimCutter(prompt), SentenceCutter()
        end = 0
        while True:
            n, tail = claims.claims(text, end)
            assert claims.fixed[:n] + tail == find_claims(text[:end], prompt=prompt)
            n, tail = cut.sentences(text, end)
            assert cut.fixed[:n] + tail == sentences(text[:end])
            if end == len(text):
                break
            end = min(len(text), end + rng.randint(0, 12))


# --------------------------------------------------------------------- through the store
ENGINE = EngineInfo(engine_id="e1", model="tiny", hidden_size=4, num_layers=6, layers=[1],
                    dtype="float32", capture_method="forward_hook", pid=1, started_at=0.0)
TEXTS = [
    "The capital of France is Paris. It was founded by the Romans in 52 BC, long before "
    "King Louis XIV of France built Versailles.\nQ: What is 3.14?\nA: Pi, roughly.",
    "Ulaanbaatar. Mongolia's currency is the tögrög; Genghis Khan was born in 1162.",
    "Sure! Here are some facts:\n1. Mount Everest is 8,849 m tall.\n2. The Nile flows "
    "through Egypt and Sudan.\n3. Rio de Janeiro hosted the 2016 Olympics. END\n\nMore",
]


def _verdict_model() -> VerdictModel:
    return VerdictModel(signals=["probe", "neg_min_logprob"], weights=[0.7, 0.3],
                        reference=[[0.0, 0.5, 1.0], [0.0, 2.0, 8.0]],
                        calibration_x=[0.0, 1.0], calibration_y=[0.05, 0.95],
                        operating_points=[OperatingPoint(target_fpr=0.1, threshold=0.5)],
                        target_fpr=0.1)


COLUMNS = columns_for(["prod", "own", "fused"], ["producer", "own", "producer"],
                      [0.5, 0.4, 0.5], ["max", "mean", "max"],
                      [None, None, (_verdict_model(), 0.5)])


def _step(seq: int, req_id: str, first: int, inputs: list[int], n_prompt: int,
          sampled: list[int], finished: bool, rng: random.Random,
          stop: StopRule | None) -> tuple[StepHeader, np.ndarray, np.ndarray]:
    rows = RequestRows(req_id=req_id, row_offset=0, num_rows=len(inputs), first_position=first,
                       input_token_ids=inputs, num_prompt_tokens=n_prompt,
                       sampled_token_ids=sampled, stop=stop,
                       sampled_logprobs=[-rng.random() * 5 for _ in sampled] or None)
    header = StepHeader(kind="step", engine=ENGINE, seq=seq, time_ns=1000 + seq,
                        num_rows=len(inputs), requests=[rows],
                        finished=[req_id] if finished else [], hook_ns=0, dropped_total=0)
    index = rows_to_score(header)
    probs = np.array([[rng.random() if rng.random() > 0.05 else np.nan for _ in range(3)]
                      for _ in index], dtype=np.float32).reshape(len(index), 3)
    return header, index, probs


def _same(live: RequestAnalysis, ref: RequestAnalysis) -> None:
    for field in ("req_id", "finished", "incomplete", "num_prompt_tokens", "version"):
        assert getattr(live.record, field) == getattr(ref.record, field), field
    assert live.tokens == ref.tokens
    assert live.decoded == ref.decoded
    assert live.verdicts == ref.verdicts
    assert [repr(r) for r in live.responses] == [repr(r) for r in ref.responses]  # NaN
    assert live.open_from == ref.open_from
    assert live.drift == ref.drift


def _run(decoder: TextDecoder, seed: int, text: str) -> None:
    rng = random.Random(seed)
    store = RequestStore()
    store.set_columns(COLUMNS)
    analyzer = Analyzer(decoder)
    tok = decoder.tokenizer
    prompt = tok.encode("Question: tell me about France and Mongolia?").ids
    answer = tok.encode(text).ids
    if rng.random() < 0.3:  # odd ids, unknown ones
        answer[rng.randrange(len(answer))] = -1 if rng.random() < 0.5 else 2
    stop = rng.choice([None, StopRule(strings=["END"]), StopRule(strings=["\n\n", "Q:"]),
                       StopRule(strings=["Olympics"], include_in_output=True, min_tokens=3)])
    req = f"cmpl-{seed}-0-1a2b3c4d"
    n_prompt = len(prompt)
    seq = 0
    header, index, probs = _step(seq, req, 0, prompt, n_prompt, [answer[0]], False, rng, stop)
    store.ingest(header, index, probs, COLUMNS)
    done = 1
    cursor, full_cursor = StreamCursor(), StreamCursor()
    while done < len(answer) + 1:
        for _ in range(rng.choice([1, 1, 2, 3, 5, 8])):
            if done >= len(answer) + 1:
                break
            seq += 1
            last = done == len(answer)
            if rng.random() < 0.08:  # recomputed from an earlier position: rows re-scored
                back = rng.randrange(0, done)
                first = n_prompt + back
                inputs = answer[back:done]
            else:
                first, inputs = n_prompt + done - 1, [answer[done - 1]]
            sampled = [] if last else [answer[done]]
            header, index, probs = _step(seq, req, first, inputs, n_prompt, sampled, last,
                                         rng, stop)
            store.ingest(header, index, probs, COLUMNS)
            done += 1
        for settled in (True, False):
            live = analyzer.current(store, req, settled_only=settled)
            snap = store.snapshot(req)
            assert live is not None and snap is not None
            ref = analyzer.analyse(*snap, store.columns, settled_only=settled)
            _same(live, ref)
            # A stream sends what scanning every verdict would.
            c = cursor if settled else full_cursor
            expect_sent = set(c.sent)
            want = [v for v in ref.verdicts if v.span.char_end <= ref.open_from
                    and (v.span.kind, v.span.char_start, v.span.char_end, v.probe)
                    not in expect_sent]
            assert c.closed(live, False) == want


@pytest.fixture(scope="module")
def decoder(model_dir: Path) -> TextDecoder:
    out = TextDecoder.from_model_dir(model_dir)
    assert out is not None
    return out


@pytest.mark.parametrize("seed", range(24))
def test_incremental_analysis_equals_analysis_from_scratch(decoder: TextDecoder,
                                                           seed: int) -> None:
    _run(decoder, seed, TEXTS[seed % len(TEXTS)])


# --------------------------------------------------------------------- work per step
PARAGRAPH = ("The capital of France is Paris. It was founded by the Romans in 52 BC, and "
             "King Louis XIV of France built Versailles in 1682.\n")


def _work_per_step(decoder: TextDecoder, n_tokens: int) -> list[dict[str, int]]:
    """Feed an answer one token per step, reading both views after each step as a stream and
    GetScores would; the analysis's work counters, per step."""
    rng = random.Random(0)
    store = RequestStore()
    store.set_columns(COLUMNS)
    analyzer = Analyzer(decoder)
    tok = decoder.tokenizer
    prompt = tok.encode("Tell me about France.").ids
    answer = (tok.encode(PARAGRAPH * (n_tokens // 20)).ids)[:n_tokens]
    req = "cmpl-work-0-1a2b3c4d"
    n_prompt = len(prompt)
    header, index, probs = _step(0, req, 0, prompt, n_prompt, [answer[0]], False, rng, None)
    store.ingest(header, index, probs, COLUMNS)
    cursor = StreamCursor()
    steps: list[dict[str, int]] = []
    before: dict[str, int] = {}
    for g in range(1, len(answer)):
        header, index, probs = _step(g, req, n_prompt + g - 1, [answer[g - 1]], n_prompt,
                                     [answer[g]], False, rng, None)
        store.ingest(header, index, probs, COLUMNS)
        settled = analyzer.current(store, req, stream=True)
        assert settled is not None
        cursor.closed(settled, False)
        assert analyzer.current(store, req) is not None
        found = store.live(req, lambda _: None)
        assert found is not None
        work = found[1].work()
        steps.append({k: v - before.get(k, 0) for k, v in work.items()})
        before = work
    return steps


def test_one_steps_work_does_not_grow_with_the_answer(decoder: TextDecoder) -> None:
    steps = _work_per_step(decoder, 1200)
    assert all(s["resets"] == 0 and s["views_made"] == 0 for s in steps[5:])
    assert all(s["decoded"] == 1 for s in steps[1:])  # each token decoded once, when it came
    early, late = steps[50:250], steps[-200:]  # the same paragraphs, 1000 tokens apart
    for counter in ("claim_cuts", "sentence_cuts", "claims_judged", "sentences_judged"):
        assert max(s[counter] for s in late) <= max(s[counter] for s in early), counter
        # and every claim and sentence is cut and judged a bounded number of times
        assert sum(s[counter] for s in steps) <= 12 * len(steps), counter
