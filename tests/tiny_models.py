"""Tiny random-weight HF models of each supported family, written as real HF directories."""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3")


def tiny_hf_config(family: str, tied: bool = False, vocab_size: int = 128):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=24, **common)  # head_dim ≠ hidden/heads, as in real Qwen3
    raise ValueError(family)


def write_tiny_hf_model(directory: Path, family: str, tied: bool = False, seed: int = 0, std: float = 0.3) -> Path:
    """Every parameter (norms and biases too) random, so a wrong mapping shows in the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, tied), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
