"""The served held-out evaluation's metrics and labelling, on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks import heldout_metrics as hm
from benchmarks.heldout_eval import Job, Reply, label_longform, label_short, plain_prompt
from benchmarks.heldout_report import markdown
from detector.api.liedetector.v1 import detector_pb2 as pb
from detector.engine.token_features import entropy_of
from detector.serving.client import Scores, scores_from_pb
from probes.datasets.schema import Question, Shot
from probes.labeling import label_longform_claim


def test_auroc_on_known_inputs() -> None:
    assert hm.auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert hm.auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert hm.auroc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert hm.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert math.isnan(hm.auroc([1, 1], [0.1, 0.2]))
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y
    from sklearn.metrics import roc_auc_score

    assert hm.auroc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_bootstrap_resamples_entities_and_drops_nan() -> None:
    y = [0, 0, 1, 1, 0, 1]
    scores = {"probe": [0.1, 0.2, 0.9, 0.8, 0.3, 0.7],
              "neg_min_logprob": [0.5, 0.6, 0.4, float("nan"), 0.5, 0.6]}
    out = hm.bootstrap_aurocs(y, scores, ["a", "a", "b", "b", "c", "d"], n_boot=200)
    assert out["n"] == 5 and out["n_dropped_nan"] == 1 and out["n_entities"] == 4
    probe = out["auroc"]["probe"]
    assert probe["point"] == 1.0 and probe["lo"] <= probe["point"] <= probe["hi"]
    diff = out["probe_minus_baseline"]
    assert diff["point"] == pytest.approx(1.0 - out["auroc"]["neg_min_logprob"]["point"])
    one_class = hm.bootstrap_aurocs([1, 1], {"probe": [0.2, 0.3]}, ["a", "b"], n_boot=10)
    assert one_class["auroc"]["probe"]["point"] is None


def test_verdict_metrics() -> None:
    labels = ["retrieval", "retrieval", "fabrication", "fabrication", "fabrication", "refusal"]
    flagged = [True, False, True, True, False, True]
    m = hm.verdict_metrics(labels, flagged)
    assert m["answers"] == 5 and m["false_flag_rate"] == 0.5
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(2 / 3)


def test_logprob_baselines_on_claim_tokens() -> None:
    lps = [-0.1, -2.0, -0.5, -0.05]
    tops = [[-0.1, -3.0], [-0.7, -0.7], [-0.5, -1.0], [-0.05]]
    b = hm.logprob_baselines(lps, tops, 1, 3)
    assert b["neg_min_logprob"] == 2.0 and b["neg_mean_logprob"] == pytest.approx(1.25)
    assert b["mean_entropy"] == pytest.approx((math.log(2) + entropy_of([-0.5, -1.0], None)) / 2)
    assert math.isnan(hm.logprob_baselines(lps, tops, 3, 6)["neg_min_logprob"])


VALUES = {"capital": ["Tirana", "Tirane"], "currency": ["Lek", "Albanian lek", "ALL"],
          "language": ["Albanian"]}
OTHERS = {"capital": {"AL": ["Tirana"], "RS": ["Belgrade"]},
          "currency": {"AL": ["Lek", "ALL"], "DE": ["Euro", "EUR"]},
          "language": {"AL": ["Albanian"], "GR": ["Greek"]}}
PROMPT = "Tell me about Albania: its capital, its currency and its languages."


@pytest.mark.parametrize(("claim", "label"), [
    ("Tirana", "retrieval"), ("the Albanian lek", "retrieval"), ("Albanian", "retrieval"),
    ("Belgrade", "fabrication"), ("Euro", "fabrication"), ("Greek", "fabrication"),
    ("Europe", "unlabelled"), ("1912", "unlabelled"), ("Albania", "echo"),
    ("All", "unlabelled"),  # a currency code counts only as written
])
def test_longform_claims_of_a_real_country(claim: str, label: str) -> None:
    got, _ = label_longform_claim(claim, subject="Albania", invented=False, values=VALUES,
                                     other_values=OTHERS, prompt=PROMPT, entity_key="AL")
    assert got == label


@pytest.mark.parametrize(("claim", "label"), [
    ("UTC+8", "retrieval"), ("8 hours", "retrieval"), ("UTC-8", "fabrication"),
    ("UTC+5:30", "fabrication"), ("1.5", "unlabelled"), ("UTC+1", "fabrication"),
])
def test_longform_offsets_keep_their_sign_and_fraction(claim: str, label: str) -> None:
    """A city at UTC+8 beside one at UTC-8 and one at UTC+5:30: normalised matching alone
    read "UTC-8" as "UTC+8" and "1.5" as containing "1"."""
    got, _ = label_longform_claim(
        claim, subject="Chengdu", invented=False, values={"utc offset": ["UTC+8", "+8"]},
        other_values={"utc offset": {"LA": ["UTC-8", "-8"], "IN": ["UTC+5:30"],
                                     "PA": ["UTC+1", "+1"]}},
        prompt="Tell me about the time in Chengdu.", entity_key="CD")
    assert got == label


def test_longform_claims_of_an_invented_country() -> None:
    kw = {"subject": "Norvania", "invented": True, "values": {}, "other_values": OTHERS,
          "prompt": PROMPT.replace("Albania", "Norvania")}
    assert label_longform_claim("Norvania City", **kw)[0] == "fabrication"
    assert label_longform_claim("Norvanian", **kw)[0] == "echo"
    assert label_longform_claim("Norvania", **kw)[0] == "echo"
    assert label_longform_claim("the Norvanian dinar", **kw)[0] == "fabrication"


def _scores(text: str, spans: list[tuple[int, int, int, int, float]], probe: str = "p",
            threshold: float = 0.5) -> Scores:
    """What GetScores returns (through detector.serving.client) for ``text`` with these claims."""
    out = pb.ScoresResponse(text=text, state=pb.REQUEST_STATE_FINISHED)
    flagged = 0
    for cs, ce, ts, te, score in spans:
        out.spans.append(pb.Span(char_start=cs, char_end=ce, token_start=ts, token_end=te,
                                 text=text[cs:ce], kind="claim", probe=probe, score=score,
                                 threshold=threshold, flagged=score >= threshold))
        flagged += score >= threshold
    out.verdicts.append(pb.ResponseVerdict(probe=probe, score=max(s[4] for s in spans),
                                           threshold=threshold, flagged=flagged > 0,
                                           claims=len(spans), flagged_claims=flagged))
    return scores_from_pb(out)


def _question() -> Question:
    return Question(id="heldout_region_country:X", topic="heldout_region_country",
                    domain="geography", entity="country:AL", subject="Elbasan",
                    question="Which country is the region of Elbasan part of?",
                    answers=["Albania"],
                    shots=[Shot(question="Which country is the region of Hokkaido part of?",
                                answer="Japan")])


def test_short_answer_takes_the_served_claim_that_carries_it() -> None:
    q = _question()
    job = Job("chat", q.topic, q.topic, q.entity, q.subject, False, question=q,
              request_id="r1")
    text = "Elbasan is part of Greece."
    # tokens: "El" "basan" " is" " part" " of" " Greece" "."
    reply = Reply(text=text, logprobs=[-0.1, -0.2, -0.1, -0.3, -0.1, -2.5, -0.1],
                  tops=[[-0.1]] * 7, scores=_scores(text, [(19, 25, 5, 6, 0.9)]))
    item = label_short(job, reply, "p")
    assert item.label == "fabrication" and item.claim == "Greece"
    assert item.probe == pytest.approx(0.9) and item.neg_min_logprob == 2.5
    assert item.claim_flagged and item.verdict_flagged and item.token_span == (5, 6)
    assert "Question: Which country is the region of Elbasan" in plain_prompt(q)
    assert "Q:" not in plain_prompt(q)


def test_longform_labels_every_served_claim() -> None:
    from probes.datasets.heldout import LongformSubject

    s = LongformSubject("country:AL", "Albania", False, VALUES)
    job = Job("longform", "longform_real", "longform_country", s.entity, s.name, False,
              longform=s, request_id="r2")
    text = "Its capital is Tirana and it uses the Euro."
    reply = Reply(text=text, logprobs=[-0.1] * 10, tops=[[-0.1]] * 10,
                  scores=_scores(text, [(15, 21, 3, 4, 0.2), (38, 42, 8, 9, 0.7)]))
    items = label_longform(job, reply, "p")
    assert [(i.claim, i.label) for i in items] == [("Tirana", "retrieval"),
                                                   ("Euro", "fabrication")]


def test_markdown_renders_a_minimal_result() -> None:
    block = {"point": 0.7, "lo": 0.6, "hi": 0.8}
    result = {"model": "m", "probe": {"name": "p", "threshold": 0.5},
              "styles": {"plain": {"n": 10, "n_fabrication": 5, "n_retrieval": 5,
                                   "auroc": {"probe": block, "neg_min_logprob": block},
                                   "probe_minus_baseline": {"point": 0.0, "lo": -0.1,
                                                            "hi": 0.1}}},
              "verdicts": {"plain": {"answers": 10, "fabrication": 5, "retrieval": 5,
                                     "false_flag_rate": 0.2, "recall": 0.6,
                                     "precision": 0.75}}}
    md = markdown(result)
    assert "| plain | 10 (5 / 5) | 0.70 [0.60, 0.80]" in md and "| 20% | 60% | 75% |" in md
