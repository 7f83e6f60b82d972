"""Pushing the trainer's weights into the rollout engine.

k1.5's path (`hybrid.weight_sync=disk`): every pipeline stage writes its weights, gathered over TP and
named as in HF, as safetensors into shared memory (`hybrid.shm_dir`, /dev/shm by default), in buckets
of at most `hybrid.bucket_size_mb`, so a rank never holds more than one bucket beyond its shard. The
engine then loads the directory with `update_weights_from_disk` and reports the new weight version,
which is checked before any rollout uses it. The directory is removed once the engine has loaded it.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.errors import UserError
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError


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


class StaleEngineWeights(EngineError):
    """The engine did not take the pushed weights."""


class DiskWeightSync:
    """`write` is collective (every trainer rank); `load` runs where the engine client lives (the driver)."""

    def __init__(self, shm_dir: str | Path, run_dir: Path, bucket_bytes: int):
        root = Path(shm_dir)
        if not root.is_dir():
            raise UserError(f"hybrid.shm_dir {root} is not a directory; point it at shared memory (/dev/shm) "
                            "or another directory both trainer and engine can read")
        # One directory per run (ranks on a node derive the same name), so two runs never collide.
        run_key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
        self.directory = root / f"megatron-rl-weights-{run_key}"
        self.bucket_bytes = bucket_bytes

    def write(self, trainer, weight_version: str) -> WrittenWeights:
        from megatron_rl.train.convert_commands import write_hf_model

        started = time.monotonic()
        target = self.directory / f"v{weight_version}"
        written = write_hf_model(trainer.model, trainer.arch, target, trainer.hf_source, self.bucket_bytes)
        return WrittenWeights(weight_version, target, written, time.monotonic() - started)

    def load(self, engine: EngineClient, weights: WrittenWeights) -> None:
        """Have the engine load `weights`, check it reports their version, then free the shared memory."""
        started = time.monotonic()
        try:
            engine.update_weights_from_disk(str(weights.path), weight_version=weights.weight_version)
            reported = engine.weight_version()
            if reported != weights.weight_version:
                raise StaleEngineWeights(f"the engine at {engine.base_url} reports weight version {reported!r} after "
                                         f"loading version {weights.weight_version!r}")
        finally:
            shutil.rmtree(weights.path, ignore_errors=True)
        weights.load_seconds = time.monotonic() - started

    def close(self) -> None:
        """Free the shared memory this run's weights still hold (every rank may call it)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DiskWeightSync:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
