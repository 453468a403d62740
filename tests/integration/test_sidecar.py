"""The sidecar process scores every generated token of the right request, read over gRPC.

A probe is fitted on rows captured from the real server, then the sidecar is started with
it. Each token's score read back over gRPC must equal the same probe applied to
transformers' hidden state for the same position: a row attributed to the wrong request
or position would give another number.
"""

from __future__ import annotations

import threading
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from support import LAYERS, complete, complete_many, start_sidecar, wait_for_engine

from detector.artifact import load_probe
from detector.serving.client import DetectorClient, DetectorError, RequestState
from detector.sidecar.scorer import FusedProbeScorer

pytestmark = pytest.mark.vllm

@pytest.fixture(scope="module")
def sidecar(vllm_server, probe_dir, model_dir, tmp_path_factory):
    proc = start_sidecar(vllm_server.channel, tmp_path_factory.mktemp("sidecar"),
                         probes=[probe_dir], model_dir=model_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(sidecar):
    with DetectorClient(sidecar.grpc_address) as c:
        yield c


def _expected_probabilities(hf_model, probe_dir, sequence: list[int]) -> np.ndarray:
    art = load_probe(probe_dir)
    scorer = FusedProbeScorer([art], captured_layers=LAYERS, hidden_size=576,
                              device=torch.device("cpu"))
    with torch.no_grad():
        out = hf_model(torch.tensor([sequence]), output_hidden_states=True)
    rows = torch.stack([out.hidden_states[k][0] for k in LAYERS])
    return scorer.probabilities(scorer.logits(rows))[:, 0].numpy()


def test_scores_arrive_for_the_right_request(vllm_server, client, hf_model, probe_dir) -> None:
    wait_for_engine(client)
    jobs = [{"prompt": p, "max_tokens": n, "request_id": f"score-{i}"} for i, (p, n) in
            enumerate([("The largest planet is", 10), ("Berlin is the capital of", 14),
                       ("Photosynthesis converts light into", 18)])]
    responses = complete_many(vllm_server.base_url, jobs)
    seen = []
    for job, resp in zip(jobs, responses):
        prompt = resp["choices"][0]["prompt_token_ids"]
        generated = resp["choices"][0]["token_ids"]
        reply = client.get_scores(job["request_id"], wait_until_finished=True, timeout=30)
        assert reply.state is RequestState.FINISHED, reply.incomplete_reason
        assert [t.token_id for t in reply.tokens] == generated
        assert reply.probes == ("word-start",)
        assert all(t.scored for t in reply.tokens)  # producer rows exist for every token
        # The producer of generated token g is the row at position len(prompt) + g - 1.
        expected = _expected_probabilities(hf_model, probe_dir, (prompt + generated)[:-1])
        got = np.array([t.scores[0].probability for t in reply.tokens])
        np.testing.assert_allclose(got, expected[len(prompt) - 1:], atol=2e-3)
        seen.append(got)
        # Text and spans index into exactly what the API client received.
        assert reply.text == resp["choices"][0]["text"]
        assert "".join(t.text for t in reply.tokens) == reply.text
        claims = [s for s in reply.spans if s.kind == "claim"]
        assert claims, "no claim spans were judged"
        for span in reply.spans:
            assert reply.text[span.char_start:span.char_end] == span.text
            if span.kind == "claim":  # the max over the claim's tokens
                member = got[span.token_start:span.token_end]
            else:  # a sentence: the highest claim inside it
                member = np.array([c.score for c in claims
                                   if span.char_start <= c.char_start < span.char_end])
            assert span.score == pytest.approx(member.max(), abs=1e-6)
            assert span.flagged == (span.score >= span.threshold)
        by_response_id = client.get_scores(resp["id"])
        assert by_response_id.engine_request_id == reply.engine_request_id
        assert reply.engine_request_id.startswith(f"{resp['id']}-0-")
    assert not np.allclose(seen[0][:5], seen[1][:5])


def test_unknown_and_malformed_ids_get_clear_statuses(client) -> None:
    with pytest.raises(DetectorError) as err:
        client.get_scores("no-such-request", timeout=5)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-request" in err.value.details
    with pytest.raises(DetectorError) as err:
        client.get_scores("", timeout=5)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_stream_delivers_scores_before_generation_ends(vllm_server, client) -> None:
    wait_for_engine(client)
    done_at: dict[str, float] = {}
    result: dict[str, dict] = {}

    def generate() -> None:
        result["resp"] = complete(vllm_server.base_url, "Write a long story about a dragon:",
                                  max_tokens=120, request_id="stream-1", ignore_eos=True)
        done_at["t"] = time.monotonic()

    worker = threading.Thread(target=generate)
    worker.start()
    first_at = None
    tokens: list[int] = []
    final = False
    for update in client.stream_scores("stream-1", timeout=120):
        if first_at is None and update.tokens:
            first_at = time.monotonic()
        tokens.extend(t.token_id for t in update.tokens)
        # Each token says when its step ended; it cannot reach us before that.
        assert all(0 < t.generated_unix_nano <= time.time_ns() for t in update.tokens)
        final = update.final
    worker.join()
    assert final
    assert first_at is not None and first_at < done_at["t"]
    assert tokens == result["resp"]["choices"][0]["token_ids"]


def test_metrics_show_the_pipeline_moving(sidecar) -> None:
    text = httpx.get(f"http://127.0.0.1:{sidecar.metrics_port}/metrics", timeout=10).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["lie_detector_steps_received_total"] > 0
    assert samples["lie_detector_rows_scored_total"] > 0
    assert samples["lie_detector_hook_connected"] == 1
    assert samples["lie_detector_probes_active"] == 1
    assert samples["lie_detector_score_delay_seconds_count"] > 0
