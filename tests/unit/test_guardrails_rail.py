"""detector/serving/guardrails.py without a sidecar: the span mapping, fail-open/closed, and the
rail in a real NeMo Guardrails ``LLMRails`` run over a fake scores source."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from detector.serving.client import DetectorError, RequestState, Scores, Span
from detector.serving.guardrails import (
    COLANG_FLOW,
    FLOW_NAME,
    ErrorSpan,
    error_spans,
    make_action,
    register,
)

TEXT = "Quorvium was discovered by Marie Curie in 1898."


def span(text: str, start: int, *, flagged: bool = True, kind: str = "claim",
         score: float = 0.9) -> Span:
    return Span(char_start=start, char_end=start + len(text), token_start=0, token_end=1,
                text=text, kind=kind, probe="default", score=score, threshold=0.5,
                flagged=flagged)


def scores(*spans: Span, text: str = TEXT) -> Scores:
    return Scores(request_id="r1", engine_request_id="e1", state=RequestState.FINISHED,
                  incomplete_reason="", num_prompt_tokens=3, probes=("default",), tokens=(),
                  spans=spans, text=text, verdicts=(), requests_with_id=1)


class FakeClient:
    def __init__(self, result: Scores | DetectorError) -> None:
        self.result = result
        self.calls: list[tuple[str, bool]] = []

    async def get_scores(self, request_id: str, *, wait_until_finished: bool = False,
                         timeout: float | None = None) -> Scores:
        self.calls.append((request_id, wait_until_finished))
        if isinstance(self.result, DetectorError):
            raise self.result
        return self.result


CURIE = span("Marie Curie", TEXT.index("Marie Curie"))
YEAR = span("1898", TEXT.index("1898"))


def test_flagged_claims_map_to_their_offsets() -> None:
    unflagged = span("Quorvium", 0, flagged=False)
    sentence = span(TEXT, 0, kind="sentence")
    got = error_spans(TEXT, scores(unflagged, CURIE, sentence, YEAR))
    assert [(e.start, e.end) for e in got] == [(CURIE.char_start, CURIE.char_end),
                                              (YEAR.char_start, YEAR.char_end)]
    assert [TEXT[e.start:e.end] for e in got] == ["Marie Curie", "1898"]
    assert got[0].reason == "default: score 0.90 >= threshold 0.50"


def test_spans_are_replaced_by_search_or_dropped() -> None:
    value = "Answer: " + TEXT  # the application checks a text with a prefix
    missing = span("Rutherford", 3)
    got = error_spans(value, scores(CURIE, missing))
    assert got == (ErrorSpan(value.index("Marie Curie"), value.index("Marie Curie") + 11,
                             "default: score 0.90 >= threshold 0.50"),)


def test_a_repeated_claim_is_placed_at_the_occurrence_nearest_its_offsets() -> None:
    text = "It was 1898, or so they say; the paper says 1898."
    second = span("1898", text.rindex("1898"))
    value = "Answer: " + text
    got = error_spans(value, scores(second, text=text))
    assert [(e.start, e.end) for e in got] == [(value.rindex("1898"), len(value) - 1)]


def run(action: Any, **context: Any) -> dict[str, Any]:
    return asyncio.run(action(context=context))


def test_action_fails_flagged_and_passes_clean() -> None:
    client = FakeClient(scores(CURIE))
    result = run(make_action("unused:1", client=client), bot_message=TEXT, response_id="r1")
    assert client.calls == [("r1", True)]
    assert result["passed"] is False
    assert [(e["start"], e["end"]) for e in result["error_spans"]] == [
        (CURIE.char_start, CURIE.char_end)]
    clean = run(make_action("unused:1", client=FakeClient(scores(span("Paris", 0, flagged=False)))),
                bot_message=TEXT, response_id="r1")
    assert clean == {"passed": True, "error_spans": (), "error": ""}


@pytest.mark.parametrize("fail_closed", [False, True])
def test_detector_errors_follow_the_policy(fail_closed: bool,
                                           caplog: pytest.LogCaptureFixture) -> None:
    down = FakeClient(DetectorError(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    with caplog.at_level(logging.WARNING, logger="detector.serving.guardrails"):
        result = run(make_action("unused:1", client=down, fail_closed=fail_closed),
                     bot_message=TEXT, response_id="r1")
        no_id = run(make_action("unused:1", client=down, fail_closed=fail_closed),
                    bot_message=TEXT)
    assert result["passed"] is (not fail_closed) and "UNAVAILABLE" in result["error"]
    assert no_id["passed"] is (not fail_closed) and "response_id" in no_id["error"]
    assert len(down.calls) == 1  # no call without an id
    assert sum("could not score" in r.getMessage() for r in caplog.records) == 2


def test_the_rail_in_a_real_llmrails_run() -> None:
    nemo = pytest.importorskip("nemoguardrails")
    config = nemo.RailsConfig.from_content(
        colang_content=COLANG_FLOW, yaml_content=f"rails:\n  output:\n    flows:\n      - {FLOW_NAME}\n")

    def generate(client: FakeClient) -> str:
        rails = register(nemo.LLMRails(config), "unused:1", client=client)
        res = rails.generate(messages=[{"role": "context", "content": {"response_id": "r1"}},
                                       {"role": "user", "content": "Who discovered Quorvium?"},
                                       {"role": "assistant", "content": TEXT}],
                             options={"rails": ["output"]})
        return str(res.response[0]["content"])

    assert generate(FakeClient(scores())) == TEXT
    assert "not confident" in generate(FakeClient(scores(CURIE)))
