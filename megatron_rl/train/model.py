"""Build a megatron-core GPTModel from a Hugging Face config (Llama, Qwen2, Qwen3 families)."""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_rl.errors import UserError

# HF architecture name → family. The families differ only in the flags of ModelArchitecture:
# Qwen2 adds q/k/v biases, Qwen3 adds per-head RMSNorm on queries and keys.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelArchitecture:
    """What megatron-core and the converter need to know of a HF decoder-only model."""

    hf_architecture: str
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    max_position_embeddings: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def architecture_from_hf_config(hf_config: dict) -> ModelArchitecture:
    architectures = hf_config.get("architectures") or []
    name = architectures[0] if architectures else hf_config.get("model_type", "<none>")
    if name not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"unsupported architecture '{name}'; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    family = SUPPORTED_ARCHITECTURES[name]

    def field(key: str, default=None):
        value = hf_config.get(key, default)
        if value is None:
            raise UserError(f"HF config of {name} lacks '{key}'; the config.json is incomplete")
        return value

    if field("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported hidden_act '{hf_config['hidden_act']}' in HF config; only silu (SwiGLU) is supported")
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"unsupported RoPE scaling '{rope_type}' in HF config; only default RoPE is supported")
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    heads = int(field("num_attention_heads"))
    hidden = int(field("hidden_size"))
    if hf_config.get("mlp_bias") or (family != "qwen2" and hf_config.get("attention_bias")):
        raise UserError("HF config asks for linear biases (attention_bias/mlp_bias) that this family does not support")
    return ModelArchitecture(
        hf_architecture=name,
        family=family,
        num_layers=int(field("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(field("intermediate_size")),
        num_attention_heads=heads,
        num_query_groups=int(hf_config.get("num_key_value_heads") or heads),
        head_dim=int(hf_config.get("head_dim") or hidden // heads),
        vocab_size=int(field("vocab_size")),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        max_position_embeddings=int(hf_config.get("max_position_embeddings", 4096)),
    )


def check_parallel_layout(arch: ModelArchitecture, tp: int, pp: int) -> None:
    """Fail early, in the parent process, on a layout that cannot split this model."""
    problems = []
    if arch.num_attention_heads % tp or arch.num_query_groups % tp:
        problems.append(f"attention heads ({arch.num_attention_heads}) and KV heads ({arch.num_query_groups}) must be divisible by TP={tp}")
    if arch.vocab_size % tp:
        problems.append(f"vocab size {arch.vocab_size} must be divisible by TP={tp}")
    if arch.ffn_hidden_size % tp:
        problems.append(f"ffn size {arch.ffn_hidden_size} must be divisible by TP={tp}")
    if arch.num_layers % pp:
        problems.append(f"{arch.num_layers} layers must be divisible by PP={pp}")
    if problems:
        raise UserError("parallel layout does not fit the model: " + "; ".join(problems) + "; choose other --tp/--pp")


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def build_gpt_model(arch: ModelArchitecture, dtype: torch.dtype = torch.float32):
    """Build this rank's GPTModel stage; megatron's TP/PP groups must be initialised already."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer import TransformerConfig

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    check_parallel_layout(arch, tp, pp)
    on_gpu = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        # Must match parallel_state: the tied-embedding PP sync reads it.
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # RL batches have a different length in every microbatch.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # config validation asks for it even for dense models
        # gloo's batched p2p mismatches simultaneous same-shape sends; the unbatched path is exact.
        batch_p2p_comm=False,
    )
    if transformer_engine_available():
        layer_spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=arch.qk_norm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
        parallel_output=True,
    )
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    return model


def causal_attention_mask(sequence_length: int) -> torch.Tensor:
    """megatron's boolean mask, True = masked; explicit because its default is built on CUDA."""
    return torch.triu(torch.ones(sequence_length, sequence_length, dtype=torch.bool), diagonal=1)[None, None]
