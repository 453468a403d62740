"""Stop strings: the sidecar keeps to the text the API client received, as vLLM cuts it.

vLLM matches stop strings in the API process, after the engine (and the sidecar) ran past
them; these tests pin the cut, the hold-back while a request runs, the wire fields that
carry the rule and the hook that reads it."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from detector.channel.wire import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    EngineInfo,
    RequestRows,
    StepHeader,
    StopRule,
    decode,
    encode_step,
)
from detector.engine.capture import ScheduledRequest, StepAssembler
from detector.engine.vllm_adapter import _stop_rule
from detector.sidecar.analysis import Analyzer
from detector.sidecar.stops import apply_stops, find_stop, partial_stop_start
from detector.sidecar.records import RequestRecord, stop_rule_nbytes
from detector.sidecar.scores import TokenScore
from detector.sidecar.store import RequestStore
from detector.sidecar.text import DecodedText
from support import FakePublisher

ENGINE = EngineInfo(
    engine_id="e", model="tiny", hidden_size=4, num_layers=6, layers=[1, 3],
    dtype="float32", capture_method="forward_hook", pid=1, started_at=0.0,
)


def decoded(*pieces: str) -> DecodedText:
    """Text of generated tokens as the sidecar's decoder lays it out ("" = a token with no
    text yet, e.g. the first bytes of a character)."""
    return DecodedText.from_pieces(pieces)


def rule(*strings: str, include: bool = False, min_tokens: int = 0) -> StopRule:
    return StopRule(strings=strings, include_in_output=include, min_tokens=min_tokens)


def random_case(rng: random.Random, *, extra: str, stop_chars: str, min_pieces: int
                ) -> tuple[list[str], list[str]]:
    """Token pieces (``extra`` is one more kind of piece) and distinct stop strings of 1-3
    ``stop_chars`` for the property tests below."""
    alphabet = ["a", "b", "\n", "Q", ":", "ab", "\nQ", "b\n", "", extra]
    pieces = [rng.choice(alphabet) for _ in range(rng.randint(min_pieces, 8))]
    strings = list(dict.fromkeys(
        "".join(rng.choice(stop_chars) for _ in range(rng.randint(1, 3)))
        for _ in range(rng.randint(1, 3))))
    return pieces, strings


def token_texts(d: DecodedText) -> list[str]:
    return [d.text[s:e] for s, e in zip(d.starts, d.ends)]


# ------------------------------------------------------------------ the cut
def test_first_occurrence_cuts_before_the_stop() -> None:
    cut = apply_stops(decoded(" Rome", "\n", "Q", ":", " What", "\n"), rule("\n"))
    assert cut.decoded.text == " Rome"
    assert cut.num_tokens == 1 and token_texts(cut.decoded) == [" Rome"]
    assert cut.stopped


def test_include_stop_str_in_output_keeps_the_stop() -> None:
    cut = apply_stops(decoded(" Rome", "\n", "Q", ":"), rule("\n", include=True))
    assert cut.decoded.text == " Rome\n"
    assert token_texts(cut.decoded) == [" Rome", "\n"]


def test_stop_inside_a_token_clips_that_token() -> None:
    d = decoded(" Ro", "me\nQ", ":")
    cut = apply_stops(d, rule("\n"))
    assert cut.decoded.text == " Rome" and token_texts(cut.decoded) == [" Ro", "me"]
    cut = apply_stops(d, rule("\n", include=True))
    assert cut.decoded.text == " Rome\n" and token_texts(cut.decoded) == [" Ro", "me\n"]
    # A stop at the very start returns nothing at all.
    cut = apply_stops(decoded("\nQ", ":"), rule("\n"))
    assert cut.decoded.text == "" and cut.num_tokens == 0 and cut.stopped


def test_several_stop_strings_the_earliest_ending_wins() -> None:
    assert apply_stops(decoded("a", "\n", "Q:"), rule("Q:", "\n")).decoded.text == "a"
    # "bc" ends before "abcd" does, although "abcd" starts first (vLLM checks per token).
    assert find_stop("xabcd", rule("abcd", "bc")) == (2, 4)
    # Both end together: the first in the request's list wins.
    assert find_stop("abc", rule("bc", "abc")) == (1, 3)
    assert find_stop("abc", rule("abc", "bc")) == (0, 3)


def test_min_tokens_skips_stops_in_the_first_tokens() -> None:
    d = decoded("\n", "ab", "\n", "c")
    assert apply_stops(d, rule("\n")).decoded.text == ""
    assert apply_stops(d, rule("\n", min_tokens=1)).decoded.text == "\nab"
    assert not apply_stops(d, rule("\n", min_tokens=4)).stopped
    # A stop that begins inside the first min_tokens tokens but ends after them counts.
    assert apply_stops(decoded("a\n", "Q"), rule("\nQ", min_tokens=1)).decoded.text == "a"


def test_no_stop_changes_nothing() -> None:
    d = decoded(" Rome", ".", "")  # the last one: end of sequence, no text
    assert apply_stops(d, None) == (d, 3, False)
    assert apply_stops(d, rule("\n")) == (d, 3, False)
    assert apply_stops(d, None, final=False) == (d, 3, False)


def test_unicode_offsets_count_characters() -> None:
    # The emoji's first bytes decode to nothing: that token is kept with the character.
    d = decoded("Ça", "", "🙂", "。次")
    cut = apply_stops(d, rule("。"))
    assert cut.decoded.text == "Ça🙂" and cut.num_tokens == 3
    cut = apply_stops(d, rule("🙂"))
    assert cut.decoded.text == "Ça" and cut.num_tokens == 1
    cut = apply_stops(d, rule("次", include=True))
    assert cut.decoded.text == "Ça🙂。次" and token_texts(cut.decoded)[-1] == "。次"


# ------------------------------------------------------------------ while it runs
def test_partial_match_is_held_back_until_decided() -> None:
    stop = rule("\nQ")
    running = apply_stops(decoded(" Rome", "\n"), stop, final=False)
    assert running.decoded.text == " Rome" and running.num_tokens == 1 and not running.stopped
    # The next token decides: it completes the stop ...
    assert apply_stops(decoded(" Rome", "\n", "Q"), stop, final=False).num_tokens == 1
    # ... or it does not, and the held token goes out ...
    assert apply_stops(decoded(" Rome", "\n", "The"), stop, final=False).num_tokens == 3
    # ... or the request ends and it was returned after all.
    assert apply_stops(decoded(" Rome", "\n"), stop, final=True).decoded.text == " Rome\n"


def test_a_token_reaching_into_a_partial_match_is_held_whole() -> None:
    # " Rome\n" may still lose its "\n": sending it now would send text the client never gets.
    cut = apply_stops(decoded(" Paris", " Rome\n"), rule("\nQ"), final=False)
    assert token_texts(cut.decoded) == [" Paris"] and cut.decoded.text == " Paris"
    assert partial_stop_start(" Paris Rome\n", rule("\nQ")) == len(" Paris Rome")
    assert partial_stop_start("abab", rule("ababc", "bz")) == 0
    # With include_stop_str_in_output a later match ends after all of this text: no hold.
    assert apply_stops(decoded(" Rome", "\n"), rule("\nQ", include=True), final=False).num_tokens == 2


def test_tokens_sent_while_running_are_exactly_the_final_ones() -> None:
    """What a stream sends step by step (each token once, never taken back) equals the
    final answer, for random texts and stop rules."""
    rng = random.Random(7)
    for _ in range(3000):
        pieces, strings = random_case(rng, extra=" ", stop_chars="ab\nQ:", min_pieces=0)
        stop = rule(*strings, include=rng.random() < 0.3, min_tokens=rng.randint(0, 2))
        final = apply_stops(decoded(*pieces), stop, final=True)
        sent: list[str] = []
        for k in range(len(pieces) + 1):
            now = apply_stops(decoded(*pieces[:k]), stop, final=False)
            texts = token_texts(now.decoded)
            assert texts[:len(sent)] == sent, (pieces, stop)
            sent = texts
            if now.stopped:
                break
        assert token_texts(final.decoded)[:len(sent)] == sent, (pieces, stop)
        assert "".join(token_texts(final.decoded)) == final.decoded.text


def test_same_text_as_vllms_own_detokenizer() -> None:
    """vLLM's incremental detokenizer fed one token per step, with its stop check, returns
    exactly the text the sidecar keeps."""
    detok = pytest.importorskip("vllm.v1.engine.detokenizer")

    class Pieces(detok.BaseIncrementalDetokenizer):
        def __init__(self, params: SimpleNamespace, pieces: list[str]) -> None:
            super().__init__(SimpleNamespace(sampling_params=params))
            self.pieces = pieces

        def decode_next(self, next_token_id: int) -> str:
            return self.pieces[next_token_id]

    rng = random.Random(11)
    for _ in range(2000):
        pieces, strings = random_case(rng, extra="é", stop_chars="ab\nQ:é", min_pieces=1)
        params = SimpleNamespace(stop=strings, min_tokens=rng.randint(0, 2),
                                 include_stop_str_in_output=rng.random() < 0.3)
        vllm = Pieces(params, pieces)
        stopped = False
        for i in range(len(pieces)):
            if vllm.update([i], stop_terminated=False) is not None:
                stopped = True
                break
        ours = apply_stops(decoded(*pieces), _stop_rule(params))
        assert ours.decoded.text == vllm.output_text, (pieces, params)
        assert ours.stopped == stopped
        # vLLM also returns the token that completes the stop; we keep those with text.
        assert ours.num_tokens <= len(vllm.token_ids)


# ------------------------------------------------------------------ analysis
class PieceDecoder:
    """Stands in for TextDecoder: token id i decodes to pieces[i]."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, generated: list[int], prompt_tail: list[int] = ()) -> DecodedText:
        return decoded(*(self.pieces[t] for t in generated))

    def text_of(self, token_ids: list[int]) -> str:
        return ""


def test_analysis_covers_only_the_returned_text() -> None:
    analyzer = Analyzer(PieceDecoder([" Rome", "\n", "Q", ":"]))  # type: ignore[arg-type]
    record = RequestRecord("cmpl-x-0-12345678", "e", 4, generated=[0, 1, 2, 3],
                           stop=rule("\n"))
    tokens = [TokenScore(position=4 + i, token_id=i, scores={}) for i in range(4)]
    out = analyzer.analyse(record, tokens, None)
    assert out.text == " Rome" and [t.token_id for t in out.tokens] == [0]
    # The engine has not reported the end yet, but the client's text is final.
    assert out.record.finished and not record.finished
    # Running, "\n" may begin the stop "\nQ": its token waits for the next one.
    record_q = RequestRecord("r", "e", 4, stop=rule("\nQ"))
    held = analyzer.analyse(record_q, tokens[:2], None)
    assert held.text == " Rome" and len(held.tokens) == 1 and not held.record.finished


# ------------------------------------------------------------------ wire
def one_step(stop: StopRule | None) -> StepHeader:
    req = RequestRows(req_id="r", row_offset=0, num_rows=2, first_position=0,
                      num_prompt_tokens=2, input_token_ids=[5, 6], sampled_token_ids=[7],
                      stop=stop)
    return StepHeader(engine=ENGINE, seq=0, time_ns=1, num_rows=2, requests=[req])


def frames(header: StepHeader) -> list[bytes]:
    return [bytes(f) for f in encode_step(header, torch.zeros((2, header.num_rows, 4)))]


def test_wire_round_trip_of_the_stop_rule() -> None:
    stop = rule("\n", "Q:", "🙂" * MAX_STOP_CHARS, include=True, min_tokens=3)
    header, _ = decode(frames(one_step(stop)))
    assert header.requests[0].stop == stop
    header, _ = decode(frames(one_step(None)))
    assert header.requests[0].stop is None


def test_messages_without_stop_fields_still_decode() -> None:
    raw = frames(one_step(None))
    head = json.loads(raw[0])
    del head["requests"][0]["stop"]  # what an older hook sends
    header, _ = decode([json.dumps(head).encode(), raw[1]])
    assert header.requests[0].stop is None


@pytest.mark.parametrize("bad", [
    {"strings": ["x"] * (MAX_STOP_STRINGS + 1)},
    {"strings": ["x" * (MAX_STOP_CHARS + 1)]},
    {"strings": [""]},
    {"strings": []},
    {"strings": "\n"},
    {"strings": [3]},
    {"strings": ["\n"], "min_tokens": -1},
    {"strings": ["\n"], "include_in_output": "sometimes"},
])
def test_oversized_or_odd_stop_rules_are_refused(bad: dict) -> None:
    """The request's share is refused alone (issue 23: one request's bad field costs only
    that request)."""
    raw = frames(one_step(None))
    head = json.loads(raw[0])
    head["requests"][0]["stop"] = bad
    header, _ = decode([json.dumps(head).encode(), raw[1]])
    (refused,) = header.refused
    assert refused.req_id == head["requests"][0]["req_id"] and "stop" in refused.reason
    assert not header.requests


# ------------------------------------------------------------------ hook and store
def test_hook_reads_the_stop_rule_from_sampling_params() -> None:
    params = SimpleNamespace(stop="\n", include_stop_str_in_output=True, min_tokens=2)
    assert _stop_rule(params) == rule("\n", include=True, min_tokens=2)
    assert _stop_rule(SimpleNamespace(stop=["a", "b"], include_stop_str_in_output=False,
                                      min_tokens=0)) == rule("a", "b")
    for none in (None, SimpleNamespace(stop=None), SimpleNamespace(stop=[])):
        assert _stop_rule(none) is None
    # Beyond the wire's bounds, or not UTF-8: not sent, rather than spoil the whole step.
    for bad in (["x"] * (MAX_STOP_STRINGS + 1), ["x" * (MAX_STOP_CHARS + 1)], ["\ud800"]):
        assert _stop_rule(SimpleNamespace(stop=bad, include_stop_str_in_output=False,
                                          min_tokens=0)) is None


def test_the_rule_travels_once_and_the_store_keeps_it() -> None:
    asm = StepAssembler(FakePublisher())  # type: ignore[arg-type]
    stop = rule("\n")
    first = ScheduledRequest("cmpl-a-0-1234abcd", 3, 0, 3, [1, 2, 3], stop=stop)
    later = ScheduledRequest("cmpl-a-0-1234abcd", 1, 3, 3, None)
    for sched, token in ((first, 40), (later, 41)):
        asm.close_step(asm.open_step(torch.zeros((2, sched.num_rows, 4)), [sched], []),
                       {sched.req_id: [token]})
    headers = []
    for pending in asm.publisher.offered:
        header = StepHeader(engine=ENGINE, seq=pending.seq, time_ns=1 + pending.seq,
                            num_rows=int(pending.rows.shape[1]), requests=pending.requests)
        headers.append(decode(frames(header))[0])
    assert [h.requests[0].stop for h in headers] == [stop, None]
    store, without = RequestStore(), RequestStore()
    for header in headers:
        store.ingest(header, np.empty(0, dtype=np.int64), None, None)
        plain = [r.model_copy(update={"stop": None}) for r in header.requests]
        without.ingest(header.model_copy(update={"requests": plain}),
                       np.empty(0, dtype=np.int64), None, None)
    record, _ = store.snapshot("cmpl-a")
    assert record.stop == stop and record.generated == [40, 41]
    assert without.snapshot("cmpl-a")[0].stop is None
    assert store.stats().bytes - without.stats().bytes == stop_rule_nbytes(stop)
