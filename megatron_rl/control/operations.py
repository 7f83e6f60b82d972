"""Operator requests to a running RL run (pause, stop) and the run's status, as the `runs` CLI sees them.

Two places carry them, one per kind of run:
- etcd (control.store=etcd): `<run prefix>operation` holds the pending `RunOperation`, `<run prefix>status`
  the driver's `RunStatus`, next to the phase record (hybrid/phases.py) and the sidecars' records;
- the run directory (the embedded default, whose in-process store no other process can reach):
  RUN_DIR/control/operation.json and RUN_DIR/control/status.json, each replaced atomically.

The driver looks for a pending operation at every iteration boundary (and, for `pause --now`, during
the rollout), carries it out, and records the outcome in its status.
"""
from __future__ import annotations

import datetime
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field, ValidationError

from megatron_rl.atomic_file import atomic_text_file
from megatron_rl.control.store import MetadataStore, run_prefix
from megatron_rl.errors import UserError

if TYPE_CHECKING:
    from megatron_rl.hybrid.weight_sync import RegisteredWeights

OperationKind = Literal["pause", "stop"]
RunState = Literal["running", "paused", "stopped", "done", "failed"]


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunOperation(BaseModel):
    """An operator's request: pause (checkpoint, free the devices, resumable) or stop (the same, final)."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    op: OperationKind
    now: bool = False  # abort the rollout in progress instead of waiting for the iteration's end
    requested_at: str = Field(default_factory=utc_now)


class IterationSummary(BaseModel):
    iteration: int
    reward_mean: float | None = None
    accuracy: float | None = None
    rollout_tokens_per_s: float | None = None


class EngineSummary(BaseModel):
    state: str  # the sidecar's: starting, ready, restarting, stopped, failed
    engine_url: str
    weight_version: str | None = None
    restarts: int = 0


class RunStatus(BaseModel):
    """What the driver publishes after every iteration, and when it pauses, stops or fails."""

    run_name: str
    run_dir: str
    state: RunState
    driver: str  # host:pid of the driving process
    iteration: int
    weight_version: str | None = None
    last_checkpoint: str | None = None
    recent: list[IterationSummary] = []  # the last few iterations, oldest first
    operation: RunOperation | None = None  # the last operation carried out
    engines: list[EngineSummary] = []  # the run's rollout engines (rollout.engines)
    message: str | None = None
    updated_at: str = Field(default_factory=utc_now)


class RunControl:
    """Where one run's operation and status live: etcd (`store`) or the run directory."""

    def __init__(self, run_dir: Path, run_name: str, store: MetadataStore | None = None):
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.store = store
        self._folder = self.run_dir / "control"

    def _key(self, name: str) -> str:
        return run_prefix(self.run_name) + name

    def _read(self, name: str, model):
        if self.store is not None:
            raw = self.store.get(self._key(name))
        else:
            path = self._folder / f"{name}.json"
            raw = path.read_bytes() if path.is_file() else None
        if raw is None:
            return None
        try:
            return model.model_validate_json(raw)
        except ValidationError as error:
            raise UserError(f"run {self.run_name}: its {name} record is unreadable ({error.errors()[0]['msg']}); "
                            "delete it to start afresh") from None

    def _write(self, name: str, record: BaseModel | None) -> None:
        if self.store is not None:
            if record is None:
                self.store.delete(self._key(name))
            else:
                self.store.put(self._key(name), record.model_dump_json())
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        path = self._folder / f"{name}.json"
        if record is None:
            path.unlink(missing_ok=True)
            return
        with atomic_text_file(path) as file:
            file.write(record.model_dump_json(indent=1))

    def pending_operation(self) -> RunOperation | None:
        return self._read("operation", RunOperation)

    def request(self, operation: RunOperation) -> None:
        self._write("operation", operation)

    def clear_operation(self) -> None:
        self._write("operation", None)

    def status(self) -> RunStatus | None:
        return self._read("status", RunStatus)

    def publish(self, status: RunStatus) -> None:
        self._write("status", status)

    def registered_weights(self) -> list[RegisteredWeights]:
        """The weight versions (disk path) on record in etcd with each node's copy; none without a store."""
        from megatron_rl.hybrid.weight_sync import RegisteredWeights, weights_prefix

        if self.store is None:
            return []
        records = []
        for key, raw in sorted(self.store.get_prefix(weights_prefix(self.run_name)).items()):
            try:
                records.append(RegisteredWeights.model_validate_json(raw))
            except ValidationError as error:
                raise UserError(f"run {self.run_name}: its weight record {key} is unreadable "
                                f"({error.errors()[0]['msg']}); the run rewrites it at its next weight sync") from None
        return records


def driver_alive(driver: str) -> bool | None:
    """Whether the `host:pid` driver process lives: checked here if it is this host's, else unknown (None)."""
    import socket

    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def control_for_run_dir(run_dir: Path) -> RunControl:
    """The RunControl of an existing run directory, from the config it recorded (etcd or the directory)."""
    from megatron_rl.config import load_config
    from megatron_rl.control.store import store_from_config

    config_path = Path(run_dir) / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass the --run-dir of a run")
    config = load_config(config_path)
    store = store_from_config(config.control) if config.control.store == "etcd" else None
    return RunControl(run_dir, config.control.run_name, store)

