"""Tiny random-weight models built from configs, with the embedded SmolLM2 tokenizer.

Two kinds, both seeded, in seconds instead of minutes:

- ``build_tiny_model``: one folder per architecture family in ``ARCHITECTURES`` (hidden 64,
  4 decoder layers so layers 1..3 can be captured). They differ in how the plugin reads the
  residual stream: Llama and Qwen3 implement vLLM's EAGLE-3 aux-hidden-state interface,
  Gemma 3 does not (forward hooks, eager mode only). The ``tiny_model`` fixture routes them
  through ``lie-detector model import``, as a user's folder would go.
- ``write_hf_folder`` / ``write_gguf``: a tiny Llama as a Hugging Face folder (with or
  without BOS, with or without a chat template) or a GGUF, for the import's own tests.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from detector.models.embedded import MARKER_FILE, default_model_dir
from detector.models.importer import adds_bos


# Files of the embedded model's folder that make up its tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
HIDDEN = 64
NUM_LAYERS = 4
SEED = 0


@dataclass(frozen=True)
class TinyArch:
    """One architecture: its name in tests and whether capture needs eager mode."""

    name: str
    architecture: str  # config.json "architectures"[0], vLLM's model class
    aux_hidden_states: bool  # implements vLLM's EAGLE-3 interface (torch.compile is fine)

    @property
    def needs_eager(self) -> bool:
        """Forward hooks read the residual stream only in eager mode."""
        return not self.aux_hidden_states


ARCHITECTURES = (
    TinyArch("llama", "LlamaForCausalLM", aux_hidden_states=True),
    TinyArch("qwen3", "Qwen3ForCausalLM", aux_hidden_states=True),
    TinyArch("gemma3", "Gemma3ForCausalLM", aux_hidden_states=False),
)


def _config(arch: TinyArch, tokenizer_config: dict):
    """A transformers config of ``arch`` at the tiny size, with the tokenizer's special ids."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    # vLLM's CPU attention supports head sizes 32, 64, 80, ... only (16 fails at the first
    # request, not at start-up: "Unsupported CPU attention configuration: head_dim=16").
    common = dict(
        vocab_size=49152, hidden_size=HIDDEN, intermediate_size=128,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer_config["bos_token_id"],
        eos_token_id=tokenizer_config["eos_token_id"],
        pad_token_id=tokenizer_config["pad_token_id"],
    )
    if arch.name == "llama":
        return LlamaConfig(**common)
    if arch.name == "qwen3":
        return Qwen3Config(**common)
    if arch.name == "gemma3":
        # Alternating local and global attention, with a window shorter than the capture
        # prompts so the sliding-window path really runs; query_pre_attn_scalar is the
        # attention scale's denominator (head_dim in the released models).
        return Gemma3TextConfig(
            **common, query_pre_attn_scalar=32, sliding_window=32,
            layer_types=["sliding_attention", "full_attention"] * (NUM_LAYERS // 2),
            architectures=[arch.architecture],
        )
    raise ValueError(f"unknown tiny architecture {arch.name!r}")


def _special_ids(source: Path) -> dict:
    """bos/eos/pad ids of the embedded model (its config.json agrees with its tokenizer)."""
    config = json.loads((source / "config.json").read_text())
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def build_tiny_model(arch: TinyArch, out: Path, tokenizer_source: Path | None = None) -> Path:
    """Write a seeded random-weight ``arch`` model folder at ``out`` and return it."""
    import torch
    from transformers import AutoModelForCausalLM

    from detector.models.embedded import resolve_model

    source = Path(tokenizer_source) if tokenizer_source else resolve_model(None)
    config = _config(arch, _special_ids(source))
    config.architectures = [arch.architecture]
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(source / name, out / name)
    return out


# ----------------------------------------------------------- the import's own tiny Llama
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


def write_gguf(path: Path, *, add_bos: bool, seed: int = 3, shape: Shape = Shape(),
               qtype: Any = None) -> Path:
    """A float32 GGUF of a tiny Llama with SmolLM2's byte-level BPE vocabulary and chat template.

    ``qtype`` (a ``gguf.GGMLQuantizationType``, e.g. Q4_1 as the embedded model's file) stores
    the weight matrices quantised instead; the norms stay float32, as llama.cpp writes them.
    """
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

    def add_tensor(name: str, array: Any) -> None:
        if qtype is None or array.ndim < 2:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    for i in range(shape.layers):
        pre = f"model.layers.{i}."
        add_tensor(f"blk.{i}.attn_q.weight", _permute(state[pre + "self_attn.q_proj.weight"], shape.heads))
        add_tensor(f"blk.{i}.attn_k.weight", _permute(state[pre + "self_attn.k_proj.weight"], shape.kv_heads))
        for gguf_name, hf_name in names.items():
            add_tensor(f"blk.{i}.{gguf_name}.weight", state[f"{pre}{hf_name}.weight"])
    add_tensor("output_norm.weight", state["model.norm.weight"])
    add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = ["ARCHITECTURES", "NUM_LAYERS", "Shape", "TinyArch", "build_tiny_model", "tiny_llama",
           "write_gguf", "write_hf_folder"]
