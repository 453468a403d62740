"""Helpers that used to be written two or three times: one function each, same outputs.

The expected numbers and strings are what the earlier copies returned on the same inputs
(probes.capture.entropy_of, benchmarks.heldout_metrics.token_entropy, the three accent
foldings, probes.verdict_fit._midranks, the loop in probes.evaluate.baseline_scores).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detector import claims
from detector.claims import MAX_ANSWER_WORDS, ascii_fold, fold
from detector.engine.token_features import entropy_of, topk_entropy
from detector.ranks import midranks
from detector.verdict import VerdictModel
from probes import labeling
from probes.datasets import countries
from probes.evaluate import baseline_scores
from probes.spans import SpanTable, neg_min_logprob
from probes.verdict_fit import _midranks

# One position of the completions API's top_logprobs.
API_TOP = {" Paris": -0.0512, " Lyon": -3.2, " Marseille": -4.75, " the": -5.5, " P": -6.25,
           " Nice": -7.0}


def test_entropy_of_gives_what_capture_and_the_heldout_baseline_gave() -> None:
    assert entropy_of(API_TOP, 20) == pytest.approx(0.26584734279935635, abs=1e-15)
    assert entropy_of(API_TOP, 3) == pytest.approx(0.21979113857946997, abs=1e-15)
    # The held-out baseline's form: values with gaps (None, -inf), all of them.
    values = [*API_TOP.values(), None, -math.inf]
    assert entropy_of(values, None) == pytest.approx(0.26584734279935635, abs=1e-15)
    assert math.isnan(entropy_of({}, 20)) and math.isnan(entropy_of([None, -math.inf], None))


def test_entropy_of_is_the_hooks_formula() -> None:
    # The engine's topk_entropy on the same scores (float32 there): training and serving
    # read one formula.
    scores = torch.tensor([list(API_TOP.values())])
    assert entropy_of(API_TOP) == pytest.approx(float(topk_entropy(scores)[0]), abs=1e-6)


def test_k_none_keeps_the_extra_alternative_the_api_may_add() -> None:
    top = {str(i): math.log(1 / 21) for i in range(21)}
    assert entropy_of(top, None) == pytest.approx(math.log(21))
    assert entropy_of(top) == pytest.approx(math.log(20))  # TOP_K = 20


@pytest.mark.parametrize(("text", "folded", "claim_fold", "label_norm"), [
    ("São Tomé", "Sao Tome", "sao tome", "sao tome"),
    ("Łódź", "odz", "odz", "odz"),
    ("東京", "", "東京", ""),  # claims keep a word with no ASCII form as it is
    ("  Crème-brûlée! ", "  Creme-brulee! ", "creme brulee", "creme brulee"),
    ("ß straße", " strae", "strae", "strae"),
    ("İstanbul", "Istanbul", "istanbul", "istanbul"),
])
def test_one_accent_folding_same_results(text: str, folded: str, claim_fold: str,
                                         label_norm: str) -> None:
    assert ascii_fold(text) == folded
    assert countries.ascii_fold is ascii_fold  # the datasets' name for it
    assert fold(text) == claim_fold
    assert labeling.normalize(text) == label_norm


def test_max_answer_words_is_the_claims_constant() -> None:
    assert labeling.MAX_ANSWER_WORDS is claims.MAX_ANSWER_WORDS == MAX_ANSWER_WORDS == 6


def test_midranks_as_fitting_ranked_before() -> None:
    v = np.array([3.0, 1.0, np.nan, 3.0, 2.0, np.inf, 1.0])
    assert _midranks(v).tolist() == [0.8, 0.2, 0.5, 0.8, 0.5, 0.5, 0.2]
    assert _midranks(np.array([np.nan])).tolist() == [0.5]


def test_midranks_as_the_verdict_ranks() -> None:
    ref = np.array([1.0, 2.0, 2.0, 4.0])
    out = midranks(np.array([0.0, 2.0, 3.0, 9.0, np.nan, -np.inf]), ref)
    np.testing.assert_array_equal(out, [0.0, 0.5, 0.75, 1.0, np.nan, np.nan])
    model = VerdictModel.model_construct(signals=["probe", "neg_min_logprob"],
                                         reference=[ref.tolist(), [0.0, 1.0]])
    np.testing.assert_array_equal(model.ranks(np.array([[2.0, 0.5], [np.nan, 1.0]])),
                                  [[0.5, 0.5], [np.nan, 0.75]])


def _table(logprobs: list[float], entropies: list[float], counts: list[int]) -> SpanTable:
    n, t = len(counts), len(logprobs)
    zeros = np.zeros(n)
    return SpanTable(
        layers=[0], rows=np.zeros((1, 1, 1)), ids=zeros, y=zeros, groups=zeros, topics=zeros,
        domains=zeros, invented=zeros, styles=zeros, texts=zeros, questions=zeros,
        token_start=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
        token_count=np.asarray(counts, dtype=np.int64), token_span=np.zeros(t),
        producer_row=np.zeros(t), own_row=np.zeros(t),
        logprobs=np.asarray(logprobs, dtype=np.float64),
        entropies=np.asarray(entropies, dtype=np.float64))


def test_baseline_scores_neg_min_logprob_is_the_verdicts_signal() -> None:
    nan = float("nan")
    table = _table([-0.5, -2.0, nan, nan, -1.0, -0.25], [0.1, 0.3, nan, 0.2, nan, 0.4],
                   [2, 1, 3])
    spans = np.array([2, 0, 1])
    scores = baseline_scores(table, spans)
    assert list(scores) == ["neg_min_logprob", "neg_mean_logprob", "mean_entropy"]
    np.testing.assert_array_equal(scores["neg_min_logprob"], [1.0, 2.0, nan])
    np.testing.assert_array_equal(scores["neg_min_logprob"], neg_min_logprob(table, spans))
    np.testing.assert_allclose(scores["neg_mean_logprob"], [0.625, 1.25, nan])
    np.testing.assert_allclose(scores["mean_entropy"], [0.3, 0.2, nan])
    assert all(s.dtype == np.float64 for s in scores.values())
    assert all(s.shape == (0,) for s in baseline_scores(table, np.array([], int)).values())
