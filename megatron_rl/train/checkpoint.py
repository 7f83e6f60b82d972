"""Megatron checkpoints: dist_checkpointing model (+ optimizer) state with a manifest.

Layout of a checkpoint directory:
    manifest.json   format, architecture, the TP/PP it was saved at, iteration, optimizer present,
                    every other file's size, and a checksum
    hf/             the HF config.json and tokenizer files, so export needs no other input
    model/          megatron-core dist_checkpointing (torch_dist), loadable at any TP/PP layout
    run/            files the caller adds (the RL run's driver state: sampler, replay buffer, ...)

A checkpoint is written into `<dir>.tmp` and renamed when complete, so a half-written one is
never mistaken for a checkpoint. Reading one checks every file's size and the checksum, which covers
the sizes of all files and the contents of hf/ and run/ (the model files, gigabytes, by size only).

A run keeps its checkpoints under RUN_DIR/checkpoints/ (`RunCheckpoints`): iteration-NNNNNN/ directories
and a `latest` file naming the newest complete one, replaced atomically after each save.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch.distributed as dist

from megatron_rl.atomic_file import fsync_directory
from megatron_rl.errors import UserError
from megatron_rl.hf_checkpoint import copy_tokenizer_files
from megatron_rl.train.model import ModelArchitecture

FORMAT = "megatron-rl-checkpoint"
FORMAT_VERSION = 2
RUN_FILES = "run"  # the subdirectory of caller-supplied files


@dataclass
class CheckpointManifest:
    architecture: dict
    tp: int
    pp: int
    iteration: int = 0
    has_optimizer: bool = False
    extra: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # path relative to the checkpoint → size in bytes
    checksum: str = ""
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
    _verify(Path(directory), manifest)
    return manifest


def _listed_files(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_size for path in sorted(directory.rglob("*"))
            if path.is_file() and path.name != "manifest.json"}


def _checksum(directory: Path, files: dict[str, int]) -> str:
    digest = hashlib.sha256()
    for name, size in sorted(files.items()):
        digest.update(f"{name}\0{size}\0".encode())
        if name.split("/", 1)[0] in ("hf", RUN_FILES):
            digest.update(hashlib.sha256((directory / name).read_bytes()).digest())
    return digest.hexdigest()


def _verify(directory: Path, manifest: CheckpointManifest) -> None:
    found = _listed_files(directory)
    for name, size in manifest.files.items():
        if name not in found:
            raise UserError(f"checkpoint {directory} is corrupt: {name} is missing; use another checkpoint")
        if found[name] != size:
            raise UserError(f"checkpoint {directory} is corrupt: {name} has {found[name]} bytes, the manifest says "
                            f"{size}; use another checkpoint")
    if _checksum(directory, manifest.files) != manifest.checksum:
        raise UserError(f"checkpoint {directory} is corrupt: its checksum does not match its files; use another checkpoint")


def read_run_file(directory: str | Path, name: str) -> bytes:
    """A file the saver added under run/ (read_manifest first: it verifies the checkpoint)."""
    path = Path(directory) / RUN_FILES / name
    if not path.is_file():
        raise UserError(f"checkpoint {directory} has no {RUN_FILES}/{name}; it was not saved by an RL run")
    return path.read_bytes()


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
    run_files: dict[str, bytes] | None = None,
) -> None:
    """Collective: every rank calls it. `hf_source` holds the HF config.json and tokenizer files;
    `run_files` (given on rank 0) are written under run/ and covered by the checksum."""
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
        if run_files:
            (staging / RUN_FILES).mkdir()
            for name, content in run_files.items():
                (staging / RUN_FILES / name).write_bytes(content)
        files = _listed_files(staging)
        manifest = CheckpointManifest(
            architecture=arch.to_dict(),
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            iteration=iteration,
            has_optimizer=optimizer is not None,
            extra=extra or {},
            files=files,
            checksum=_checksum(staging, files),
        )
        (staging / "manifest.json").write_text(json.dumps(asdict(manifest), indent=2))
        _sync_directory(staging)
        # Replacing a checkpoint of the same iteration (pause --now after a saved iteration): the old one
        # is set aside first, so a crash in between leaves one of the two for `RunCheckpoints.latest`.
        replaced = _replaced(directory)
        if directory.exists():
            directory.rename(replaced)
        staging.rename(directory)
        shutil.rmtree(replaced, ignore_errors=True)
    dist.barrier()


def _replaced(directory: Path) -> Path:
    return directory.with_name(directory.name + ".replaced")


def _sync_directory(directory: Path) -> None:
    """fsync every file and the directory itself, so a rename after it cannot outrun the data."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(directory)


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


class RunCheckpoints:
    """RUN_DIR/checkpoints/: complete `iteration-NNNNNN/` checkpoints and `latest` naming the newest."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def path(self, iteration: int) -> Path:
        return self.root / f"iteration-{iteration:06d}"

    def mark_latest(self, iteration: int) -> None:
        """Point `latest` at a complete checkpoint (atomically), then drop all but the newest `keep`."""
        pointer = self.root / "latest"
        staging = self.root / "latest.tmp"
        staging.write_text(self.path(iteration).name + "\n")
        os.replace(staging, pointer)
        complete = sorted(p for p in self.root.glob("iteration-*") if p.is_dir() and p.name.count(".") == 0)
        for old in complete[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (verified), or None if the run has none."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        directory = self.root / pointer.read_text().strip()
        if not directory.exists() and _replaced(directory).is_dir():  # a crash while it was being replaced
            _replaced(directory).rename(directory)
        read_manifest(directory)  # raises UserError naming what is wrong
        return directory
