"""HF ↔ megatron-core weight mapping under tensor and pipeline parallelism.

HF → Megatron: every rank reads only the HF tensors its own parameters need and keeps its TP
shard. Megatron → HF: parameters are gathered across TP one at a time and handed out in buckets
of bounded size, so no rank ever holds more than one bucket beyond its own shard. The same bucket
stream feeds HF export and (later) weight sync into the rollout engine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_rl.errors import UserError
from megatron_rl.hf_checkpoint import SafetensorsReader
from megatron_rl.train.model import ModelArchitecture

# How a megatron parameter is split over TP ranks, and how it is built from HF tensors.
REPLICATED, VOCAB, COLUMN, ROW, QKV, FC1 = "replicated", "vocab", "column", "row", "qkv", "fc1"

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# Local-spec name and Transformer-Engine-spec name of the same weight share one entry.
_LAYER_PARAMS = {
    "input_layernorm.weight": (REPLICATED, ["input_layernorm.weight"]),
    "self_attention.linear_qkv.layer_norm_weight": (REPLICATED, ["input_layernorm.weight"]),
    "self_attention.linear_qkv.weight": (QKV, ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"]),
    "self_attention.linear_qkv.bias": (QKV, ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]),
    "self_attention.q_layernorm.weight": (REPLICATED, ["self_attn.q_norm.weight"]),
    "self_attention.k_layernorm.weight": (REPLICATED, ["self_attn.k_norm.weight"]),
    "self_attention.linear_proj.weight": (ROW, ["self_attn.o_proj.weight"]),
    "pre_mlp_layernorm.weight": (REPLICATED, ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.layer_norm_weight": (REPLICATED, ["post_attention_layernorm.weight"]),
    "mlp.linear_fc1.weight": (FC1, ["mlp.gate_proj.weight", "mlp.up_proj.weight"]),
    "mlp.linear_fc2.weight": (ROW, ["mlp.down_proj.weight"]),
}


@dataclass(frozen=True)
class ParamMapping:
    split: str
    hf_names: list[str]


def layer_offset(model) -> int:
    """Global index of this pipeline stage's first layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def param_mapping(mcore_name: str, offset: int, arch: ModelArchitecture) -> ParamMapping:
    if mcore_name == "embedding.word_embeddings.weight":
        return ParamMapping(VOCAB, ["model.embed_tokens.weight"])
    if mcore_name == "output_layer.weight":
        # With tied embeddings on PP>1 the last stage holds its own copy of the embedding.
        return ParamMapping(VOCAB, ["model.embed_tokens.weight" if arch.tied_embeddings else "lm_head.weight"])
    if mcore_name == "decoder.final_layernorm.weight":
        return ParamMapping(REPLICATED, ["model.norm.weight"])
    match = _LAYER.match(mcore_name)
    if match and match.group(2) in _LAYER_PARAMS:
        split, names = _LAYER_PARAMS[match.group(2)]
        global_layer = int(match.group(1)) + offset
        return ParamMapping(split, [f"model.layers.{global_layer}.{name}" for name in names])
    raise UserError(f"no HF mapping for megatron parameter '{mcore_name}'; this model variant is not supported")


def shard_for_rank(split: str, hf_tensors: list[torch.Tensor], arch: ModelArchitecture, tp: int, rank: int) -> torch.Tensor:
    """The TP shard that rank `rank` holds, built from the full HF tensors."""
    if split == REPLICATED:
        return hf_tensors[0]
    if split in (VOCAB, COLUMN):
        return hf_tensors[0].chunk(tp, dim=0)[rank]
    if split == ROW:
        return hf_tensors[0].chunk(tp, dim=1)[rank]
    if split == QKV:
        # megatron interleaves per KV group: [q heads of group 0, k0, v0, q heads of group 1, ...].
        query, key, value = hf_tensors
        groups, head_dim = arch.num_query_groups, arch.head_dim
        heads_per_group = arch.num_attention_heads // groups
        trailing = query.shape[1:]
        fused = torch.cat(
            [
                query.reshape(groups, heads_per_group, head_dim, *trailing),
                key.reshape(groups, 1, head_dim, *trailing),
                value.reshape(groups, 1, head_dim, *trailing),
            ],
            dim=1,
        )
        return fused.reshape(-1, *trailing).chunk(tp, dim=0)[rank]
    if split == FC1:
        gate, up = hf_tensors
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    raise ValueError(split)


def _joined(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, except that one tensor comes back as itself: at TP = 1 a merge copies nothing."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


def merge_shards(split: str, shards: list[torch.Tensor], arch: ModelArchitecture) -> list[torch.Tensor]:
    """Inverse of shard_for_rank: the full HF tensors from every TP rank's shard. They may be views of the
    shards (always at TP = 1, except q, k and v, whose per-group interleave only a copy undoes)."""
    if split == REPLICATED:
        return [shards[0]]
    if split in (VOCAB, COLUMN):
        return [_joined(shards, 0)]
    if split == ROW:
        return [_joined(shards, 1)]
    if split == QKV:
        groups, head_dim = arch.num_query_groups, arch.head_dim
        heads_per_group = arch.num_attention_heads // groups
        trailing = shards[0].shape[1:]
        fused = _joined(shards, 0).reshape(groups, heads_per_group + 2, head_dim, *trailing)
        return [
            fused[:, :heads_per_group].reshape(-1, *trailing),
            fused[:, heads_per_group].reshape(-1, *trailing),
            fused[:, heads_per_group + 1].reshape(-1, *trailing),
        ]
    if split == FC1:
        halves = [shard.chunk(2, dim=0) for shard in shards]
        return [_joined([gate for gate, _ in halves], 0), _joined([up for _, up in halves], 0)]
    raise ValueError(split)


def _tp_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


@torch.no_grad()
def load_hf_weights(model, reader: SafetensorsReader, arch: ModelArchitecture) -> None:
    """Fill this rank's parameters from a HF checkpoint, reading only the tensors it needs."""
    tp_rank, tp = _tp_rank_and_size()
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        mapping = param_mapping(name, offset, arch)
        shard = shard_for_rank(mapping.split, [reader.get(hf_name) for hf_name in mapping.hf_names], arch, tp, tp_rank)
        if shard.shape != param.shape:
            raise UserError(
                f"{reader.directory}: {', '.join(mapping.hf_names)} give shape {tuple(shard.shape)} for '{name}', "
                f"expected {tuple(param.shape)}; the weights do not match config.json"
            )
        param.copy_(shard)


def _exported_params(named_parameters, arch: ModelArchitecture):
    from megatron.core import parallel_state

    for name, param in named_parameters:
        # A tied output layer is the embedding's copy: HF ties it, so it is not written twice.
        if name == "output_layer.weight" and arch.tied_embeddings:
            continue
        if name == "embedding.word_embeddings.weight" and not parallel_state.is_pipeline_first_stage():
            continue
        yield name, param


@torch.no_grad()
def iter_hf_buckets(model, arch: ModelArchitecture, bucket_bytes: int, dtype: torch.dtype | None = None,
                    named_parameters=None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield this pipeline stage's weights as HF-named full tensors, in buckets of ≤ bucket_bytes.

    Collective over the TP group: every TP rank must iterate. Each yielded bucket is complete on
    every TP rank; a parameter larger than the bucket size gets a bucket of its own. Tensors may
    alias the parameters: consume a bucket before the next optimizer step. `named_parameters`
    (default: the model's) may yield CPU copies, e.g. of an offloaded trainer: each shard then
    visits the device only for its TP gather, so device memory holds one parameter at a time.
    """
    from megatron.core import parallel_state

    _, tp = _tp_rank_and_size()
    group = parallel_state.get_tensor_model_parallel_group()
    offset = layer_offset(model)
    bucket: list[tuple[str, torch.Tensor]] = []
    bucket_size = 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    for name, param in _exported_params(named_parameters if named_parameters is not None else model.named_parameters(), arch):
        mapping = param_mapping(name, offset, arch)
        shard = param.detach().to(device, non_blocking=True)
        if mapping.split == REPLICATED or tp == 1:
            shards = [shard] * tp
        else:
            shards = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(shards, shard.contiguous(), group=group)
        for hf_name, tensor in zip(mapping.hf_names, merge_shards(mapping.split, shards, arch)):
            if dtype is not None:
                tensor = tensor.to(dtype)
            tensor_bytes = tensor.numel() * tensor.element_size()
            if bucket and bucket_size + tensor_bytes > bucket_bytes:
                yield bucket
                bucket, bucket_size = [], 0
            bucket.append((hf_name, tensor.contiguous()))
            bucket_size += tensor_bytes
    if bucket:
        yield bucket
