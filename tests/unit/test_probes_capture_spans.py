"""What the capture stores for a labelled answer: the claim span that carries it."""

from __future__ import annotations

import pytest

from probes.capture import NO_CLAIM_REASON, CaptureSettings, _Runner
from probes.labeling import AnswerLabel


def runner() -> _Runner:
    r = _Runner.__new__(_Runner)  # _span reads only the settings
    r.settings = CaptureSettings()
    return r


def tokens_of(text: str, pieces: list[str]) -> list[int]:
    assert "".join(pieces) == text
    offsets, at = [], 0
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return offsets


TEXT = " The capital of Mongolia is Ulaanbaatar City."
PIECES = [" The", " capital", " of", " Mongolia", " is", " Ul", "aan", "baatar", " City", "."]
PROMPT = "Q: What is the capital of Mongolia?\nA:"


def span(result: AnswerLabel, text: str = TEXT, pieces: list[str] = PIECES,
         prompt: str | None = PROMPT):
    offsets = tokens_of(text, pieces)
    n = len(pieces) + 1  # and the stop token
    return runner()._span(result, offsets + [len(text)], len(text), list(range(n)),
                          [-0.5] * n, [{"a": -0.5, "b": -1.0}] * n, n_prompt=20, n_gen=n,
                          trainable_last=n - 2,
                          claim_of=None if prompt is None else (text, prompt))


def test_the_stored_span_is_the_claim_carrying_the_answer() -> None:
    a = TEXT.index("Ulaanbaatar")
    result = AnswerLabel(label="fabrication", reason="x", span=(a, a + len("Ulaanbaatar")),
                         answer="Ulaanbaatar")
    entry, positions = span(result)
    assert entry.label == "fabrication"
    assert entry.text == "Ulaanbaatar City" and TEXT[slice(*entry.chars)] == entry.text
    assert entry.answer_chars == result.span
    assert entry.tokens == (5, 9)  # " Ul" "aan" "baatar" " City"
    assert positions == (20 + 5 - 1, 20 + 9 - 1)
    assert len(entry.logprobs) == len(entry.entropies) == 4


@pytest.mark.parametrize("label", ["retrieval", "fabrication"])
def test_an_answer_no_claim_carries_is_left_out_and_counted(label: str) -> None:
    text = " Mongolia."  # copied from the prompt: the sidecar judges no claim here
    result = AnswerLabel(label=label, reason="x", span=(1, 9), answer="Mongolia")
    entry, positions = span(result, text, [" Mongolia", "."])
    assert positions is None
    assert entry.label == "ambiguous" and entry.reason.startswith(NO_CLAIM_REASON)
    assert label in entry.reason


def test_user_spans_are_kept_as_drawn() -> None:
    a = TEXT.index("Ulaanbaatar")
    result = AnswerLabel(label="retrieval", reason="user label", span=(a, a + 11),
                         answer="Ulaanbaatar")
    entry, positions = span(result, prompt=None)
    assert entry.chars == (a, a + 11) and entry.tokens == (5, 8)
    assert positions is not None


def _longform_choice(text: str, pieces: list[str], finish: str) -> dict:
    offsets = tokens_of(text, pieces)
    n = len(pieces) + (1 if finish == "stop" else 0)
    return {"text": text, "token_ids": list(range(n)), "prompt_token_ids": list(range(20)),
            "finish_reason": finish,
            "logprobs": {"text_offset": offsets + [len(text)] * (n - len(pieces)),
                         "token_logprobs": [-0.5] * n,
                         "top_logprobs": [{"a": -0.5, "b": -1.0}] * n}}


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_a_longform_answer_stores_one_labelled_span_per_claim(finish: str) -> None:
    """Long-form questions (answer_type "claims") are labelled claim by claim; a claim at
    the end of an answer cut off at max_tokens is left out."""
    import threading

    from probes.capture import Job
    from probes.datasets.registry import TOPICS
    from probes.store import CaptureRecord

    peru = next(q for q in TOPICS["longform_country"].build() if q.subject == "Peru")
    text = " Its capital is Lima, it uses the Chilean Peso and it lies in South America"
    pieces = [" Its", " capital", " is", " Lima", ",", " it", " uses", " the", " Chilean",
              " Peso", " and", " it", " lies", " in", " South", " America"]
    r = runner()
    r.generated_tokens = r.prompt_tokens = 0
    r._lock = threading.Lock()
    job = Job("j", CaptureRecord(id="j", source="questions", question_id=peru.id,
                                 topic=peru.topic, domain=peru.domain, group=peru.entity,
                                 subject=peru.subject, style="chat_zero_shot",
                                 question=peru.question), peru.question, question=peru)
    record, pairs = r._generated(job, _longform_choice(text, pieces, finish))
    got = {e.text: e.label for e in record.spans}
    assert got["Lima"] == "retrieval" and got["Chilean Peso"] == "fabrication"
    assert got["South America"] == ("retrieval" if finish == "stop" else "ambiguous")
    assert len(pairs) == len(record.spans)
    lima = next(p for e, p in pairs if e.text == "Lima")
    assert lima == (20 + 3 - 1, 20 + 4 - 1)  # token " Lima" is the 4th generated
