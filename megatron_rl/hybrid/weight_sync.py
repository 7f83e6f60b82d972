"""Moving the trainer's weights into the rollout engine: three paths behind one interface.

Every path is a collective over the trainer ranks, `push(trainer, weight_version, named_parameters)`,
returning `SyncedWeights`; the driver then has the engine's controller load or record that version
(EngineControl.load) and checks the engine serves it before any rollout uses it.

- `disk` (k1.5's, `DiskWeightSync` here): the weights, gathered over TP and named as in HF, are written as
  safetensors into shared memory (`hybrid.shm_dir`, /dev/shm by default) in buckets of at most
  `hybrid.bucket_size_mb`, so a rank never holds more than one bucket beyond its shard. Each node gets its
  own copy of every pipeline stage a rank of it holds (write_hf_model). The copies are registered in the
  run's metadata (`RegisteredWeights` at `<run prefix>weights/<version>`, the newest version only). Each
  engine's sidecar loads the copy on its node with `update_weights_from_disk`, first fetching what that copy
  lacks (stages trained on other nodes, or all of it on a node without trainer ranks) from the sidecars of
  the nodes that have it (hybrid/weight_delivery.py: k1.5's Mooncake step, over HTTP here). It keeps the
  directory until a newer one loaded, to re-load it after an engine crash.
- `cuda_ipc` and `nccl` (hybrid/weight_push.py): buckets handed to the engine by handle
  (`update_weights_from_tensor`) or broadcast to it (`update_weights_from_distributed`). Nothing is on
  disk: an engine that crashes loses the version. Its rollout is then interrupted (its trajectories are
  kept), the driver answers `EnginesLostWeights`, and the loop pushes the same version again (the trainer
  still holds it) and rolls out on.
"""
from __future__ import annotations

import datetime
import hashlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from megatron_rl.control.store import MetadataStore, run_prefix
from megatron_rl.errors import UserError
from megatron_rl.hf_checkpoint import WrittenDirectory


@dataclass
class SyncedWeights:
    """A weight version moved towards the engine: how many bytes, how long the trainer's side took, and
    (disk) the directory the engine loads next; `path` None: already in the engine (a push)."""

    weight_version: str
    path: Path | None
    bytes: int
    write_seconds: float  # writing the directory, or the whole push
    load_seconds: float = 0.0  # the engine loading the directory (disk), or recording the push
    buckets: int = 0  # buckets sent (push paths)
    # disk: every node's copy, and the copies' path below each node's hybrid.shm_dir
    directories: list[WrittenDirectory] = field(default_factory=list)
    shm_name: str | None = None

    @property
    def seconds(self) -> float:
        return self.write_seconds + self.load_seconds

    @property
    def gigabytes_per_second(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class RegisteredWeights(BaseModel):
    """A weight version in shared memory (disk path), as `<run prefix>weights/<version>` records it: each
    node's copy (host, directory, file sizes), what the engines' sidecars load or fetch."""

    weight_version: str
    directories: list[WrittenDirectory]
    total_bytes: int  # the model's tensors
    registered_at: datetime.datetime


SHM_DIRECTORY_PREFIX = "megatron-rl-weights-"  # a run's weight versions lie in hybrid.shm_dir/<this><run key>/


def weights_prefix(run_name: str) -> str:
    """Where a run's `RegisteredWeights` records are, one key per weight version below it."""
    return f"{run_prefix(run_name)}weights/"


def register_weights(store: MetadataStore, run_name: str, weights: SyncedWeights) -> RegisteredWeights:
    """Record the copies of `weights` as the run's newest weight version, and drop the record of any older
    one (its directories are gone once the engines load this)."""
    record = RegisteredWeights(weight_version=weights.weight_version, directories=weights.directories,
                               total_bytes=weights.bytes, registered_at=datetime.datetime.now(datetime.timezone.utc))
    key = weights_prefix(run_name) + weights.weight_version
    store.put(key, record.model_dump_json())
    for older in store.get_prefix(weights_prefix(run_name)):
        if older != key:
            store.delete(older)
    return record


@dataclass
class EnginesLostWeights:
    """A rollout's answer when an engine came back from a crash without the version pushed into it: push
    `weight_version` again, then roll out the same iteration on (its trajectories were kept)."""

    weight_version: str


class DiskWeightSync:
    """`push` is collective (every trainer rank). The engine's sidecar loads what it wrote, and owns the
    loaded directory from then on (it keeps the last one, to re-load it after an engine restart)."""

    def __init__(self, shm_dir: str | Path, run_dir: Path, bucket_bytes: int):
        root = Path(shm_dir).resolve()
        self.shm_dir = root
        if not root.is_dir():
            raise UserError(f"hybrid.shm_dir {shm_dir} is not a directory; point it at shared memory (/dev/shm) "
                            "or another directory both trainer and engine can read")
        # One directory per run (ranks on a node derive the same name), so two runs never collide.
        run_key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
        self.directory = root / f"{SHM_DIRECTORY_PREFIX}{run_key}"
        self.bucket_bytes = bucket_bytes

    def push(self, trainer, weight_version: str, named_parameters=None) -> SyncedWeights:
        """Collective. `named_parameters`: where to read the weights (default: the live parameters;
        an offloaded trainer passes its pinned CPU copies, TrainerOffload.named_parameters())."""
        from megatron_rl.train.convert_commands import write_hf_model

        started = time.monotonic()
        target = self.directory / f"v{weight_version}"
        written = write_hf_model(trainer.model, trainer.arch, target, trainer.hf_source, self.bucket_bytes,
                                 named_parameters=named_parameters)
        return SyncedWeights(weight_version, target, written.bytes, time.monotonic() - started,
                             directories=written.directories, shm_name=str(target.relative_to(self.shm_dir)))

    def close(self) -> None:
        """Free the shared memory this run's weights still hold (every rank may call it)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> DiskWeightSync:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PushToEach:
    """A push path to several engines: the version goes to each in turn (collective, as one push is)."""

    def __init__(self, pushes: list):
        self.pushes = pushes

    def push(self, trainer, weight_version: str, named_parameters=None) -> SyncedWeights:
        pushed = [push.push(trainer, weight_version, named_parameters) for push in self.pushes]
        return SyncedWeights(weight_version, None, sum(result.bytes for result in pushed),
                             sum(result.write_seconds for result in pushed), buckets=sum(result.buckets for result in pushed))

    def close(self) -> None:
        for push in self.pushes:
            push.close()

    def __enter__(self) -> PushToEach:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_weight_sync(config, run_dir: Path, engine_urls: list[str]):
    """The path `hybrid.weight_sync` names, for the engines at `engine_urls`: the disk path writes once for
    all (each engine loads the directory); push paths talk to every engine directly."""
    hybrid = config.hybrid
    bucket_bytes = hybrid.bucket_size_mb * 2**20
    if hybrid.weight_sync == "disk":
        return DiskWeightSync(hybrid.shm_dir, run_dir, bucket_bytes)
    from megatron_rl.hybrid.sidecar_protocol import load_sidecar_token
    from megatron_rl.hybrid.weight_push import DistributedWeightSync, TensorWeightSync

    kind = TensorWeightSync if hybrid.weight_sync == "cuda_ipc" else DistributedWeightSync
    api_key = load_sidecar_token(hybrid)  # engines beyond loopback ask for it
    pushes = [kind(url, bucket_bytes, timeout=config.rollout.request_timeout_s, api_key=api_key) for url in engine_urls]
    return pushes[0] if len(pushes) == 1 else PushToEach(pushes)
