"""Pushing the trainer's weights into the rollout engine.

k1.5's path (`hybrid.weight_sync=disk`): every pipeline stage writes its weights, gathered over TP and
named as in HF, as safetensors into shared memory (`hybrid.shm_dir`, /dev/shm by default), in buckets
of at most `hybrid.bucket_size_mb`, so a rank never holds more than one bucket beyond its shard. The
engine's sidecar then loads the directory with `update_weights_from_disk`, checks the engine reports
the new weight version before any rollout uses it, and deletes the directory once a newer one loaded.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.errors import UserError


@dataclass
class WrittenWeights:
    """A weight version written for the engine: where, how many bytes, and how long the write took."""

    weight_version: str
    path: Path
    bytes: int
    write_seconds: float
    load_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.write_seconds + self.load_seconds

    @property
    def gigabytes_per_second(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class DiskWeightSync:
    """`write` is collective (every trainer rank). The engine's sidecar loads what it wrote, and owns the
    loaded directory from then on (it keeps the last one, to re-load it after an engine restart)."""

    def __init__(self, shm_dir: str | Path, run_dir: Path, bucket_bytes: int):
        root = Path(shm_dir)
        if not root.is_dir():
            raise UserError(f"hybrid.shm_dir {root} is not a directory; point it at shared memory (/dev/shm) "
                            "or another directory both trainer and engine can read")
        # One directory per run (ranks on a node derive the same name), so two runs never collide.
        run_key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
        self.directory = root / f"megatron-rl-weights-{run_key}"
        self.bucket_bytes = bucket_bytes

    def write(self, trainer, weight_version: str, named_parameters=None) -> WrittenWeights:
        """Collective. `named_parameters`: where to read the weights (default: the live parameters;
        an offloaded trainer passes its pinned CPU copies, TrainerOffload.named_parameters())."""
        from megatron_rl.train.convert_commands import write_hf_model

        started = time.monotonic()
        target = self.directory / f"v{weight_version}"
        written = write_hf_model(trainer.model, trainer.arch, target, trainer.hf_source, self.bucket_bytes,
                                 named_parameters=named_parameters)
        return WrittenWeights(weight_version, target, written, time.monotonic() - started)

    def close(self) -> None:
        """Free the shared memory this run's weights still hold (every rank may call it)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DiskWeightSync:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
