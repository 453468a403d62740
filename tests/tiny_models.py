"""Tiny random-weight Llama models with SmolLM2's tokenizer, as a Hugging Face folder or a GGUF.

Built from a config, so no hub is needed; the tokenizer files come from the prepared embedded
model (tests skip when it is not prepared). Shared by the `model import` unit and vLLM tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from detector.embedded_model import MARKER_FILE, default_model_dir
from detector.model_import import adds_bos

VOCAB = 49152  # SmolLM2's tokenizer


@dataclass(frozen=True)
class Shape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    context: int = 2048  # vLLM tests serve with max_model_len 1024


def embedded_tokenizer_dir() -> Path:
    folder = default_model_dir()
    if not (folder / MARKER_FILE).is_file():
        pytest.skip(f"embedded model not prepared at {folder} (run scripts/setup.sh)")
    return folder


def tiny_llama(seed: int = 0, shape: Shape = Shape()) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, intermediate_size=shape.ffn,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=VOCAB,
        max_position_embeddings=shape.context, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    )
    model = LlamaForCausalLM(config).eval()
    # The default init (std 0.02) gives near-uniform logits; wider weights give distinct continuations.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)
    return model


def write_hf_folder(dest: Path, *, bos: bool = True, chat_template: bool = True, seed: int = 0,
                    shape: Shape = Shape()) -> Path:
    """A safetensors folder whose tokenizer adds BOS (or not) and has SmolLM2's chat template (or none)."""
    from transformers import AutoTokenizer

    tiny_llama(seed, shape).save_pretrained(dest, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    tokenizer.add_bos_token = bos
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(dest)
    assert adds_bos(AutoTokenizer.from_pretrained(dest)) == bos
    return dest


def _permute(weights: Any, n_head: int) -> Any:
    """llama.cpp's layout of q/k rows (convert_hf_to_gguf.py); transformers undoes it on load."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf(path: Path, *, add_bos: bool, seed: int = 3, shape: Shape = Shape()) -> Path:
    """A float32 GGUF of a tiny Llama with SmolLM2's byte-level BPE vocabulary and chat template."""
    import gguf

    tokenizer_dir = embedded_tokenizer_dir()
    tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["id"] for t in tokenizer_json["added_tokens"] if t["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]]

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template((tokenizer_dir / "chat_template.jinja").read_text())

    state = {k: v.float().numpy() for k, v in tiny_llama(seed, shape).state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    for i in range(shape.layers):
        pre = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(state[pre + "self_attn.q_proj.weight"], shape.heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(state[pre + "self_attn.k_proj.weight"], shape.kv_heads))
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", state[f"{pre}{hf_name}.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
