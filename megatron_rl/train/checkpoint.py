"""Megatron checkpoints: dist_checkpointing model (+ optimizer) state with a manifest.

Layout of a checkpoint directory:
    manifest.json   format, architecture, the TP/PP it was saved at, iteration, optimizer present
    hf/             the HF config.json and tokenizer files, so export needs no other input
    model/          megatron-core dist_checkpointing (torch_dist), loadable at any TP/PP layout

A checkpoint is written into `<dir>.tmp` and renamed when complete, so a half-written one is
never mistaken for a checkpoint.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.distributed as dist

from megatron_rl.errors import UserError
from megatron_rl.hf_checkpoint import copy_tokenizer_files
from megatron_rl.train.model import ModelArchitecture

FORMAT = "megatron-rl-checkpoint"
FORMAT_VERSION = 1


@dataclass
class CheckpointManifest:
    architecture: dict
    tp: int
    pp: int
    iteration: int = 0
    has_optimizer: bool = False
    extra: dict = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def model_architecture(self) -> ModelArchitecture:
        return ModelArchitecture(**self.architecture)


def read_manifest(directory: str | Path) -> CheckpointManifest:
    path = Path(directory) / "manifest.json"
    if not Path(directory).is_dir():
        raise UserError(f"checkpoint directory {directory} does not exist")
    try:
        data = json.loads(path.read_text())
        manifest = CheckpointManifest(**data)
    except FileNotFoundError:
        raise UserError(f"{directory} is not a megatron-rl checkpoint (no manifest.json); an interrupted save leaves only a .tmp directory") from None
    except (json.JSONDecodeError, TypeError) as error:
        raise UserError(f"{path} is corrupt ({error}); use another checkpoint") from None
    if manifest.format != FORMAT or manifest.format_version != FORMAT_VERSION:
        raise UserError(f"{path}: format {manifest.format} v{manifest.format_version} is not {FORMAT} v{FORMAT_VERSION}")
    return manifest


def _unwrap(model):
    return getattr(model, "module", model)


def save_checkpoint(
    directory: str | Path,
    model,
    arch: ModelArchitecture,
    hf_source: Path,
    optimizer=None,
    iteration: int = 0,
    extra: dict | None = None,
) -> None:
    """Collective: every rank calls it. `hf_source` holds the HF config.json and tokenizer files."""
    from megatron.core import dist_checkpointing, parallel_state

    directory = Path(directory)
    staging = directory.with_name(directory.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "model").mkdir(parents=True)
        (staging / "hf").mkdir()
    dist.barrier()
    sharded_state = {"model": _unwrap(model).sharded_state_dict()}
    if optimizer is not None:
        sharded_state["optimizer"] = optimizer.sharded_state_dict(sharded_state["model"])
    dist_checkpointing.save(sharded_state, str(staging / "model"))
    dist.barrier()
    if rank == 0:
        shutil.copy2(hf_source / "config.json", staging / "hf" / "config.json")
        copy_tokenizer_files(hf_source, staging / "hf")
        manifest = CheckpointManifest(
            architecture=arch.to_dict(),
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            iteration=iteration,
            has_optimizer=optimizer is not None,
            extra=extra or {},
        )
        (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    dist.barrier()


def load_checkpoint(directory: str | Path, model, optimizer=None) -> CheckpointManifest:
    """Collective: load a checkpoint saved at any TP/PP layout into this rank's model stage."""
    from megatron.core import dist_checkpointing

    manifest = read_manifest(directory)
    sharded_state = {"model": _unwrap(model).sharded_state_dict()}
    if optimizer is not None:
        if not manifest.has_optimizer:
            raise UserError(f"checkpoint {directory} has no optimizer state; load it without an optimizer")
        sharded_state["optimizer"] = optimizer.sharded_state_dict(sharded_state["model"], is_loading=True)
    loaded = dist_checkpointing.load(sharded_state, str(Path(directory) / "model"))
    # Only Transformer Engine's '_extra_state' buffers may be absent (local and TE specs interchange).
    result = _unwrap(model).load_state_dict(loaded["model"], strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("_extra_state")]
    if missing:
        raise UserError(f"checkpoint {directory} lacks {len(missing)} weights of this model (e.g. '{missing[0]}'); it was saved for another architecture")
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    return manifest
