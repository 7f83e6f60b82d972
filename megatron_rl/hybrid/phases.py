"""The phase orchestrator: the explicit state machine of a hybrid iteration, published in the metadata store.

Trainer and engine share the devices, so a run is always in exactly one phase:

    starting → sync → [eval →] rollout → release → onload → train → [checkpoint →] offload → sync → …
    … → done (or paused, failed)

- sync: the engine's weights are resumed, the new weight version is pushed and checked, then its KV
  cache is resumed (this order is the one that does not run out of memory);
- eval: greedy answers to the held-out prompts (every `eval.interval` iterations, first and last);
- rollout: the engine generates with the weight version of the phase record (an engine that crashed and
  lost its pushed weights has the same version pushed again: rollout → sync → rollout);
- release: the engine releases its memory (or is stopped, `hybrid.engine_lifecycle=restart`);
- onload / offload: the trainer's state moves to / from the devices (train/offload.py);
- train: the optimizer steps of the iteration;
- checkpoint: (when due, or asked for by an operator) the run's state saved, while it is all on the devices.

Every transition is a compare-and-swap of `<run prefix>phase` against the record this orchestrator
wrote last, so a second driver of the same run (or a stale one) cannot advance it; each transition
also writes `<run prefix>transitions/<iteration>/<n>-<phase>` with the seconds spent in the phase it
ends. Operators and `megatron-rl runs status` read these records.

The live driver also holds `<run prefix>driver` under a lease it keeps alive: a run whose phase is not
final can be taken over only once that record has expired — when its driver is dead (a crashed trainer
restarted by Kubernetes, `--auto-resume`) — never while it lives.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import Literal

from pydantic import BaseModel

from megatron_rl.control.store import MetadataStore, StoreError, StoreUnavailable, run_prefix
from megatron_rl.errors import RunError

Phase = Literal["starting", "sync", "eval", "rollout", "release", "onload", "train", "checkpoint", "offload", "paused",
                "done", "failed"]
FINAL_PHASES = ("paused", "done", "failed")  # a run in one of them has no driver

logger = logging.getLogger(__name__)

# The phases each phase may be followed by ("failed" may follow any).
NEXT_PHASES: dict[str, tuple[str, ...]] = {
    "starting": ("sync",),
    "sync": ("eval", "rollout", "paused", "done"),
    "eval": ("rollout", "paused", "done"),
    "rollout": ("release", "sync"),  # sync: a crashed engine lost its pushed weights mid-rollout
    "release": ("onload",),
    "onload": ("train", "checkpoint"),  # checkpoint: a rollout interrupted by `pause --now`
    "train": ("checkpoint", "offload"),
    "checkpoint": ("offload", "paused", "done"),
    "offload": ("sync",),
    "paused": (),
    "done": (),
    "failed": (),
}


class PhaseRecord(BaseModel):
    """The run's current phase (`<run prefix>phase`)."""

    phase: Phase
    iteration: int
    weight_version: str | None
    entered_at: float  # unix time
    driver: str  # host:pid of the process that drives the run


class PhaseTransition(BaseModel):
    """One finished phase (`<run prefix>transitions/<iteration:08d>/<n:02d>-<phase>`)."""

    phase: Phase
    iteration: int
    weight_version: str | None
    started_at: float
    seconds: float
    next_phase: Phase


class PhaseOrchestrator:
    """Advances and publishes the run's phase; collects each iteration's seconds per phase."""

    def __init__(self, store: MetadataStore, run_name: str, unavailable_retry_s: float = 10.0,
                 driver_lease_ttl_s: int = 10):
        self.store = store
        self.driver_lease_ttl_s = driver_lease_ttl_s
        self._keep_alive = None
        self.unavailable_retry_s = unavailable_retry_s  # ride out a short store outage (an etcd leader election)
        self.prefix = run_prefix(run_name)
        self.driver = f"{socket.gethostname()}:{os.getpid()}"
        self.current: PhaseRecord | None = None
        self._written: bytes | None = None  # what this orchestrator last wrote (the CAS expectation)
        self._transitions: dict[int, int] = {}  # iteration → transitions recorded for it
        self.seconds: dict[str, float] = {}  # seconds per phase since the last take_seconds()
        self._taken_at = 0.0  # take_seconds() counted the current phase up to this time

    @property
    def key(self) -> str:
        return self.prefix + "phase"

    def start(self) -> None:
        """Claim the run: it must be new, have ended (paused, done, failed), or have lost its driver (whose
        leased record is waited for to expire, up to its TTL). Then hold the driver record ourselves."""
        existing = self.store.get(self.key)
        if existing is not None:
            record = PhaseRecord.model_validate_json(existing)
            if record.phase not in FINAL_PHASES and not self._wait_for_driver_to_expire():
                raise RunError(f"run {self.prefix} is driven by {record.driver} (phase {record.phase} of iteration "
                               f"{record.iteration}), which is alive; stop it first, or give this run another "
                               "control.run_name")
        lease = self.store.lease(self.driver_lease_ttl_s)
        self.store.put(self.prefix + "driver", self.driver, lease=lease)
        self._keep_alive = lease.keep_alive()
        self._publish(PhaseRecord(phase="starting", iteration=0, weight_version=None, entered_at=time.time(),
                                  driver=self.driver), expected=existing)

    def _wait_for_driver_to_expire(self) -> bool:
        deadline = time.monotonic() + self.driver_lease_ttl_s + 2
        while self.store.get(self.prefix + "driver") is not None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    def close(self) -> None:
        """Let go of the run (the driver record goes with the lease)."""
        if self._keep_alive is not None:
            self._keep_alive.stop()
            try:
                self._keep_alive.lease.revoke()
            except StoreError as error:  # the record then expires with the lease
                logger.warning("could not revoke the driver's lease: %s", error)
            self._keep_alive = None

    def enter(self, phase: Phase, iteration: int, weight_version: str | None) -> None:
        """Move to `phase`; raises RunError for a transition the cycle does not allow."""
        if self.current is None:
            raise RuntimeError("PhaseOrchestrator.start() first")
        previous = self.current
        if phase != "failed" and phase not in NEXT_PHASES[previous.phase]:
            raise RunError(f"phase {phase} cannot follow {previous.phase} (allowed: {', '.join(NEXT_PHASES[previous.phase]) or 'none'})")
        now = time.time()
        seconds = now - previous.entered_at
        if previous.phase not in ("starting", "eval"):  # an evaluation records its own time (eval.jsonl)
            self.seconds[previous.phase] = self.seconds.get(previous.phase, 0.0) + now - max(previous.entered_at, self._taken_at)
        transition = PhaseTransition(phase=previous.phase, iteration=previous.iteration,
                                     weight_version=previous.weight_version, started_at=previous.entered_at,
                                     seconds=seconds, next_phase=phase)
        self._publish(PhaseRecord(phase=phase, iteration=iteration, weight_version=weight_version, entered_at=now,
                                  driver=self.driver), expected=self._written, transition=transition)

    def take_seconds(self) -> dict[str, float]:
        """Seconds per phase since the last call, the phase in progress counted up to now."""
        now = time.time()
        if self.current is not None and self.current.phase not in ("starting", "eval", "done", "failed"):
            phase = self.current.phase
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - max(self.current.entered_at, self._taken_at)
        self._taken_at = now
        seconds, self.seconds = self.seconds, {}
        return seconds

    def _publish(self, record: PhaseRecord, expected: bytes | None, transition: PhaseTransition | None = None) -> None:
        value = record.model_dump_json().encode()
        values = {self.key: value}
        if transition is not None:
            number = self._transitions.get(transition.iteration, 0) + 1
            values[f"{self.prefix}transitions/{transition.iteration:08d}/{number:02d}-{transition.phase}"] = (
                transition.model_dump_json().encode())
        if not self._put_many_retrying(values, expected):
            found = self.store.get(self.key)
            raise RunError(f"the phase record {self.key} changed under this driver (expected phase "
                           f"{self.current.phase if self.current else 'none'}, found "
                           f"{PhaseRecord.model_validate_json(found).phase if found else 'no record'}): another "
                           "process drives this run; give each run its own control.run_name")
        self.current = record
        self._written = value
        if transition is not None:
            self._transitions[transition.iteration] = number

    def _put_many_retrying(self, values: dict[str, bytes], expected: bytes | None) -> bool:
        deadline = time.monotonic() + self.unavailable_retry_s
        attempt = 0
        while True:
            try:
                if self.store.put_many(values, expected={self.key: expected}):
                    return True
                # A retried write whose first attempt landed (its answer lost) finds its own value.
                return attempt > 0 and self.store.get(self.key) == values[self.key]
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise
                attempt += 1
                time.sleep(0.5)
