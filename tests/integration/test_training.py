"""The training pipeline end to end on a real vLLM server with the plugin.

A dozen questions (asked plain and chat) go through the session's vLLM CPU server; their
answers are labelled, the rows of the answer spans are taken from the plugin's channel,
a probe is trained and evaluated on them, and the artifact it writes loads and passes the
sidecar's compatibility check against the served model and its captured layers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from support import LAYERS  # what the session server captures: the capture manifest records it

from detector.artifact import check_compatible, load_probe
from detector.model_identity import identify_model
from probes.capture import CaptureSettings, capture_questions
from probes.datasets.registry import build_dataset
from probes.pipeline import train_from_capture
from probes.spans import load_span_table
from probes.store import CaptureStore
from probes.train import TrainConfig

pytestmark = pytest.mark.vllm

TOPICS = ["country_continent", "state_abbreviation", "invented_country_capital",
          "invented_element_number"]


def test_capture_train_evaluate_artifact(vllm_server, model_dir: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    questions = build_dataset(TOPICS, limit_per_topic=3, seed=0)
    assert len(questions) == 12

    settings = CaptureSettings(layers=LAYERS, styles=["plain", "chat"], max_tokens=12,
                               concurrency=8, row_timeout_s=20)
    # Binds the server's channel for the duration of the capture only, then closes it.
    summary = capture_questions(questions, tmp_path / "capture", model_dir=model_dir,
                                settings=settings, base_url=vllm_server.base_url,
                                channel=vllm_server.channel, progress=False)
    assert summary.records == 24 and summary.incomplete == 0, summary.describe()

    store = CaptureStore.open(tmp_path / "capture")
    assert store.manifest.layers == LAYERS
    assert store.manifest.served_dtype == "float32"
    table = load_span_table(store)
    assert {0, 1} <= set(table.y.tolist()), "need both retrievals and fabrications"
    assert table.rows.shape[1:] == (len(LAYERS), 576)
    assert np.isfinite(table.rows).all() and np.abs(table.rows).max() > 0
    # every labelled span kept one row more than it has tokens (the producer row of its first)
    for record, span in store.iter_spans():
        if span.has_rows:
            assert span.tokens is not None
            assert span.num_rows == span.tokens[1] - span.tokens[0] + 1
            assert len(span.logprobs) == span.tokens[1] - span.tokens[0]

    # Resuming finds everything done and sends nothing.
    again = capture_questions(questions, tmp_path / "capture", model_dir=model_dir,
                              settings=settings, base_url=vllm_server.base_url,
                              channel=vllm_server.channel, progress=False)
    assert again.generated_tokens == 0 and again.records == 24

    out = tmp_path / "probe"
    config = TrainConfig(name="it-probe", Cs=[0.1], cv_folds=2, test_fraction=0.34,
                         concat_top=0, n_random_directions=3, cross_topic=False)
    result = train_from_capture(tmp_path / "capture", out, config=config, progress=False,
                                command="integration test")
    artifact = load_probe(out)
    served = identify_model(model_dir)
    check_compatible(artifact.metadata, served, LAYERS)
    assert artifact.metadata.model.fingerprint == served.fingerprint
    assert set(artifact.metadata.layers) <= set(LAYERS)
    assert artifact.metadata.score_position in ("producer", "own")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout"]["split"]["shared_groups"] == 0
    assert set(metrics["heldout"]["all"]) >= {"probe", "neg_min_logprob", "neg_mean_logprob",
                                              "mean_entropy", "random_direction"}
    assert (out / "report.html").exists() and (out / "roc.png").exists()
    assert result.metrics["data_hash"] == artifact.metadata.training["data_hash"]
    assert time.monotonic() - start < 60


def test_user_records_are_replayed_with_the_generation_rows(vllm_server, model_dir: Path,
                                                            tmp_path: Path) -> None:
    """A user's (prompt, completion) replayed through vLLM gives the rows generation gave."""
    from probes.capture import capture_user_records
    from probes.datasets.prompts import plain_prompt
    from probes.datasets.user import UserRecord, UserSpan

    settings = CaptureSettings(layers=LAYERS, styles=["plain"], max_tokens=12, concurrency=4,
                               row_timeout_s=20)
    questions = build_dataset(["country_continent", "state_abbreviation"], limit_per_topic=2)
    common = dict(model_dir=model_dir, settings=settings, base_url=vllm_server.base_url,
                  channel=vllm_server.channel, progress=False)
    capture_questions(questions, tmp_path / "generated", **common)
    generated = CaptureStore.open(tmp_path / "generated")
    by_question = {r.question_id: r for r in generated.records()}

    users = []
    for q in questions:
        rec = by_question[q.id]
        span = rec.spans[0]
        if span.chars is None or span.label not in ("retrieval", "fabrication"):
            continue
        users.append(UserRecord(id=q.id, prompt=plain_prompt(q), completion=rec.completion,
                                spans=[UserSpan(start=span.chars[0], end=span.chars[1],
                                                label=span.label)],
                                group=q.entity, topic=q.topic))
    assert users
    summary = capture_user_records(users, tmp_path / "replayed", **common)
    assert summary.incomplete == 0
    replayed = CaptureStore.open(tmp_path / "replayed")
    compared = 0
    for rec in replayed.records():
        span = rec.spans[0]
        assert span.has_rows and span.tokens is not None
        assert span.num_rows == span.tokens[1] - span.tokens[0] + 1
        assert all(np.isfinite(span.logprobs))
        original = by_question[rec.id]
        o_span = original.spans[0]
        if o_span.token_ids != span.token_ids or o_span.tokens != span.tokens:
            continue  # the completion re-tokenised differently; rows are not comparable
        a = generated.span_rows(original, o_span).astype(np.float32)
        b = replayed.span_rows(rec, span).astype(np.float32)
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= 2e-2 * scale, rec.id
        np.testing.assert_allclose(span.logprobs, o_span.logprobs, atol=2e-2)
        compared += 1
    assert compared >= 1
