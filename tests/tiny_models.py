"""Tiny random-weight model folders of several architectures, built from configs.

They exercise the whole pipeline (capture, train, serve) on families other than the
embedded model's, in seconds instead of minutes: hidden size 64, 4 decoder layers (so
layers 1..3 can be captured), the embedded SmolLM2 tokenizer (vocabulary 49,152), seeded
float32 weights. The families differ in how the plugin reads the residual stream: Llama and
Qwen3 implement vLLM's EAGLE-3 aux-hidden-state interface, Gemma 3 does not (forward hooks,
eager mode only).

``build_tiny_model`` is the one place a folder is made, so routing the folders through
``lie-detector model import`` later changes this function only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

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

    from detector.embedded_model import resolve_model

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


__all__ = ["ARCHITECTURES", "NUM_LAYERS", "TinyArch", "build_tiny_model"]
