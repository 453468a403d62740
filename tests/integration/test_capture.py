"""The plugin inside a real vLLM server captures the right rows for the right tokens.

Four concurrent requests of different lengths share engine steps; one prompt is longer than
the per-step token budget, so its prefill is chunked over several steps. Every captured row
must equal transformers' ``output_hidden_states`` for the same token ids.
"""

from __future__ import annotations

import time

import pytest
from support import (
    LAYERS,
    MAX_BATCHED_TOKENS,
    ChannelTap,
    complete_many,
    hidden_state_errors,
    token_ids,
)

pytestmark = pytest.mark.vllm

# Float32 on both sides. vLLM's CPU kernels (fused RMSNorm, its attention, torch.compile's
# fused graph) sum in other orders than transformers' eager PyTorch. Measured here: the
# largest |vLLM - transformers| over all rows of a layer is 0.4-2.1e-6 of that layer's
# largest |activation| (SmolLM2 has outlier dimensions near 2e4, so absolute errors reach
# 0.05). 1e-4 leaves ~50x headroom for other CPUs and thread counts, while a row taken
# from a neighbouring position or another request is off by the order of the row itself.
RELATIVE_TOLERANCE = 1e-4

LONG_PROMPT = " ".join(
    f"Fact {i}: the river {name} flows into the sea near the city of {city}."
    for i, (name, city) in enumerate(
        [("Elbe", "Hamburg"), ("Seine", "Le Havre"), ("Thames", "London"), ("Tagus", "Lisbon"),
         ("Rhine", "Rotterdam"), ("Loire", "Nantes"), ("Ebro", "Tortosa"), ("Po", "Venice"),
         ("Oder", "Szczecin"), ("Vistula", "Gdansk"), ("Daugava", "Riga"), ("Neva", "St Petersburg"),
         ("Douro", "Porto"), ("Garonne", "Bordeaux"), ("Shannon", "Limerick"),
         ("Tiber", "Rome"), ("Arno", "Pisa"), ("Rhone", "Marseille")]
    )
) + " Question: which river flows past Lisbon? Answer:"

JOBS = [
    {"prompt": "The capital of France is", "max_tokens": 12, "request_id": "cap-short"},
    {"prompt": "Q: What is the chemical symbol of gold?\nA:", "max_tokens": 20,
     "request_id": "cap-medium"},
    {"prompt": "Once upon a time, in a small village by the mountains, there lived",
     "max_tokens": 32, "request_id": "cap-story"},
    {"prompt": LONG_PROMPT, "max_tokens": 16, "request_id": "cap-long"},
    # Stopped by vLLM's repetition detection (" 1, 2," twice: 12 tokens) long before
    # max_tokens.
    {"prompt": "1, 2, 1, 2, 1, 2, 1, 2, 1, 2,", "max_tokens": 48, "request_id": "cap-repeat",
     "repetition_detection": {"max_pattern_size": 6, "min_count": 2}},
]


@pytest.fixture(scope="module")
def captured(vllm_server):
    """Run JOBS concurrently and collect their rows from the channel.

    Dropping steps under CPU starvation is the hook's designed behaviour (fail-open), and
    it tells us so (``dropped_total``, gaps in ``seq``). If that happened, the batch is
    sent once more under fresh ids; a capture that is incomplete without any drop fails.
    """
    tap = ChannelTap(vllm_server.channel)
    try:
        tap.wait_connected(vllm_server.base_url)
        for attempt in range(2):
            ids = [f"{job['request_id']}-{attempt}" for job in JOBS]
            drops_before = tap.last_dropped_total
            responses = complete_many(vllm_server.base_url, [
                {**job, "request_id": rid} for job, rid in zip(JOBS, ids)])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                _done(tap, rid, resp) for rid, resp in zip(ids, responses)
            ):
                time.sleep(0.1)
            if all(_done(tap, rid, resp) for rid, resp in zip(ids, responses)):
                break
            dropped = tap.last_dropped_total > drops_before or tap.seq_gaps
            assert dropped, "capture incomplete although the hook reported no dropped step"
        yield tap, responses, ids
    finally:
        tap.close()


def _done(tap: ChannelTap, request_id: str, resp: dict) -> bool:
    """Every row and every sampled token of the request has arrived."""
    try:
        _, cap = tap.find(f"cmpl-{request_id}-0")
    except AssertionError:
        return False
    prompt, generated = token_ids(resp)
    return (len(cap.sampled) >= len(generated)
            and cap.row_count >= len(prompt) + len(generated) - 1)


def test_long_prompt_was_chunked(captured) -> None:
    tap, responses, ids = captured
    prompt, _ = token_ids(responses[3])
    assert len(prompt) > MAX_BATCHED_TOKENS
    req_id, _ = tap.find(f"cmpl-{ids[3]}-0")
    firsts = sorted(r.first_position for h in tap.steps for r in h.requests
                    if r.req_id == req_id and r.first_position < len(prompt))
    assert len(firsts) >= 2, f"prefill was not chunked: chunks start at {firsts}"


def test_requests_shared_engine_steps(captured) -> None:
    tap, _, _ = captured
    assert max(len(h.requests) for h in tap.steps) >= 3


@pytest.mark.parametrize("index", range(len(JOBS)))
def test_rows_account_for_every_token(captured, index: int) -> None:
    """prompt + generated - 1 rows, each once, carrying the token it read."""
    tap, responses, ids = captured
    prompt, generated = token_ids(responses[index])
    req_id, cap = tap.find(f"cmpl-{ids[index]}-0")
    expected_rows = len(prompt) + len(generated) - 1
    assert cap.row_count == expected_rows
    assert sorted(cap.rows) == list(range(expected_rows))
    sequence = prompt + generated
    assert [cap.tokens[p] for p in range(expected_rows)] == sequence[:expected_rows]
    assert cap.sampled == generated
    assert cap.num_prompt_tokens == len(prompt)
    assert cap.finished, f"{req_id} never reported finished"


@pytest.mark.parametrize("index", range(len(JOBS)))
def test_rows_equal_transformers_hidden_states(captured, hf_model, index: int) -> None:
    tap, responses, ids = captured
    prompt, generated = token_ids(responses[index])
    _, cap = tap.find(f"cmpl-{ids[index]}-0")
    sequence = (prompt + generated)[:-1]
    for layer, (err, scale) in hidden_state_errors(hf_model, cap, sequence, LAYERS).items():
        # Shown with `pytest -rP`: the measured error behind RELATIVE_TOLERANCE.
        print(f"{JOBS[index]['request_id']} layer {layer}: max abs error {err:.3g}, "
              f"relative {err / scale:.3g}")
        assert err <= RELATIVE_TOLERANCE * scale, (
            f"layer {layer}: max |vLLM - transformers| = {err:.3g}, row scale {scale:.3g}")


def test_generated_tokens_decode_to_returned_text(captured, tokenizer) -> None:
    tap, responses, ids = captured
    for rid, resp in zip(ids, responses):
        _, cap = tap.find(f"cmpl-{rid}-0")
        assert tokenizer.decode(cap.sampled, skip_special_tokens=True) == resp["choices"][0]["text"]


def test_each_end_is_announced_with_the_last_token(captured) -> None:
    """vLLM tells the worker that a request ended only in the next step; the hook mirrors
    the scheduler's stop check, so the step that samples the last token already says so
    (whether the length, EOS or repetition rule stopped it)."""
    tap, responses, ids = captured
    repeat = responses[[j["request_id"] for j in JOBS].index("cap-repeat")]
    assert repeat["choices"][0]["finish_reason"] == "repetition", "repetition never fired"
    for rid, resp in zip(ids, responses):
        _, cap = tap.find(f"cmpl-{rid}-0")
        reason = resp["choices"][0]["finish_reason"]
        assert cap.finished_seq == cap.last_sampled_seq, (
            f"{rid} ({reason}): last token in step {cap.last_sampled_seq}, end announced "
            f"in step {cap.finished_seq}")


def test_hook_reports_its_own_time(captured) -> None:
    tap, _, _ = captured
    hook_ns = [h.hook_ns for h in tap.steps]
    assert all(ns > 0 for ns in hook_ns)
