"""Model merging (k1.5 §2.4): merged = w·A + (1 − w)·B, parameter by parameter, no training.

A and B are megatron-rl checkpoints of one architecture (and, for a meaningful average, one
initialisation: e.g. a long-CoT and a short-CoT model fine-tuned from the same base), saved at any TP/PP
layouts: each is resharded on load to the layout the merge runs at (A's, unless --tp/--pp say otherwise),
which is also the layout of the merged checkpoint. Checkpoints of different architectures are refused
before any worker starts. The merged checkpoint takes A's HF files (config, tokenizer) and has no optimizer
state.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_rl.errors import UserError
from megatron_rl.train.checkpoint import CheckpointManifest, read_manifest
from megatron_rl.train.supervised import refuse_existing_output


@torch.no_grad()
def merge_parameters_(target: dict[str, torch.Tensor], other: dict[str, torch.Tensor], weight: float) -> None:
    """target ← weight·target + (1 − weight)·other, in place, for every named tensor (the same names in both)."""
    if target.keys() != other.keys():
        raise ValueError(f"the models differ in parameters: {sorted(set(target) ^ set(other))[:3]}")
    for name, tensor in target.items():
        if tensor.shape != other[name].shape:
            raise ValueError(f"'{name}' has shape {tuple(tensor.shape)} in one model, {tuple(other[name].shape)} in the other")
        # In fp32 whatever the parameters' dtype, so a bf16 merge rounds once.
        tensor.copy_(tensor.float().mul(weight).add_(other[name].float(), alpha=1.0 - weight))


def check_compatible(a: CheckpointManifest, b: CheckpointManifest, a_path: str | Path, b_path: str | Path) -> None:
    differences = [f"{key} {a.architecture[key]!r} vs {b.architecture.get(key)!r}" for key in sorted(a.architecture)
                   if a.architecture[key] != b.architecture.get(key)]
    if differences:
        raise UserError(f"cannot merge {a_path} and {b_path}: they are different architectures ({'; '.join(differences)}); "
                        "merging needs two checkpoints of the same model, e.g. fine-tuned from one base")


def merge_checkpoints(a: str | Path, b: str | Path, weight: float, out: str | Path, tp: int | None = None,
                      pp: int | None = None) -> CheckpointManifest:
    """Write the merged checkpoint `out` at TP=`tp`, PP=`pp` (default: A's layout); returns its manifest."""
    from megatron_rl.train import parallel
    from megatron_rl.train.model import check_parallel_layout

    if not 0.0 <= weight <= 1.0:
        raise UserError(f"--weight must be in [0, 1] (merged = w·A + (1 − w)·B), got {weight}")
    manifest_a, manifest_b = read_manifest(a), read_manifest(b)
    check_compatible(manifest_a, manifest_b, a, b)
    out = refuse_existing_output(out)
    tp, pp = tp or manifest_a.tp, pp or manifest_a.pp
    check_parallel_layout(manifest_a.model_architecture, tp, pp)
    parallel.launch(_merge_on_rank, tp * pp, Path(a), Path(b), weight, out, tp, pp)
    return read_manifest(out)


def _merge_on_rank(a: Path, b: Path, weight: float, out: Path, tp: int, pp: int) -> None:
    from megatron_rl.train import parallel
    from megatron_rl.train.checkpoint import load_checkpoint, save_checkpoint
    from megatron_rl.train.model import build_gpt_model

    with parallel.model_parallel(tp, pp):
        architecture = read_manifest(a).model_architecture
        model = build_gpt_model(architecture)  # fp32, as conversion reads checkpoints: a bf16 pair merges exactly
        load_checkpoint(b, model)
        other = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        load_checkpoint(a, model)
        merge_parameters_(dict(model.named_parameters()), other, weight)
        save_checkpoint(out, model, architecture, a / "hf", iteration=0,
                        extra={"merge": {"a": str(a), "b": str(b), "weight": weight}})
