"""An imported GGUF is served by real vLLM with the BOS the GGUF asks for, and answers as transformers does."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import complete, start_vllm
from tiny_models import Shape, write_gguf

from detector.models.importer import import_model

pytestmark = pytest.mark.vllm

# Head size 64: vLLM's CPU attention does not take the unit tests' head size of 16.
SHAPE = Shape(hidden=128, layers=2, heads=2, kv_heads=1, ffn=256)
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def test_imported_gguf_serves_with_bos_and_same_tokens(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = write_gguf(tmp_path / "tiny-bos.gguf", add_bos=True, shape=SHAPE)
    out = tmp_path / "tiny-bos"
    report = import_model(gguf, out, progress=False)
    assert not report.failures, report.checks

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=8, pad_token_id=2)
        expected[prompt] = (ids[0].tolist(), generated[0, ids.shape[1]:].tolist())

    server = start_vllm(out, tmp_path / "vllm", disable=True, layers=[1, 2], enforce_eager=True)
    try:
        for prompt in PROMPTS:
            choice = complete(server.base_url, prompt, max_tokens=8)["choices"][0]
            want_prompt, want_tokens = expected[prompt]
            assert choice["prompt_token_ids"][0] == 1, "vLLM did not add the GGUF's BOS"
            assert choice["prompt_token_ids"] == want_prompt
            assert choice["token_ids"] == want_tokens, prompt
    finally:
        server.stop()
