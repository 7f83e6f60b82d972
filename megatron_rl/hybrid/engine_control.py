"""The driver's handle on the rollout engines: their lifecycle between phases, weight loads, recovery.

Three ways to reach an engine, one interface (`EngineControl`):
- an in-process sidecar (the default: `make run`, tests) that starts the embedded engine or SGLang;
- the pod's `megatron-rl sidecar` over HTTP (`hybrid.sidecar_url`);
- a bare engine someone else runs (`rollout.engine_url`): no restarts, no lifecycle but memory release.

The lifecycle (`hybrid.engine_lifecycle`):
- release: after rollout, release all engine memory; before a weight load resume the weights only;
  after it resume the rest (KV cache, CUDA graphs) — the order peers found not to run out of memory;
- restart: after rollout stop the engine; the new weights are handed to the stopped sidecar, which
  loads them when it starts the engine again (k1.5's original lifecycle).

`EngineGroup` holds the run's data-parallel engines — this pod's (`rollout.engines` of them, each behind its
own in-process sidecar, or the pod's sidecar) and other pods' (`hybrid.peer_sidecar_urls`) — and applies
every lifecycle step to all of them; the rollout master spreads requests over them.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from megatron_rl.config import Config
from megatron_rl.control.store import MetadataStore
from megatron_rl.errors import RunError, UserError
from megatron_rl.hybrid.sidecar_protocol import (
    SidecarError, SidecarStatus, SidecarUnavailable, WeightSource, load_sidecar_token, sidecar_record_key, utc_now,
)
from megatron_rl.hybrid.weight_delivery import plan_delivery
from megatron_rl.hybrid.weight_sync import SyncedWeights
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError, EngineLostWeights

logger = logging.getLogger(__name__)


class ExternalEngine:
    """A bare engine at `rollout.engine_url` behind the sidecar's operations that need no process control."""

    def __init__(self, client: EngineClient):
        self.client = client
        self.engine_url = client.base_url
        self._released: set[str] = set()
        self._kept: Path | None = None

    def status(self) -> SidecarStatus:
        return SidecarStatus(pod_name="external", state="ready", engine="sglang", engine_url=self.engine_url,
                             engine_pid=None, weight_version=self.client.weight_version(), restarts=0,
                             released_tags=sorted(self._released), updated_at=utc_now())

    def wait_ready(self, timeout: float, weight_version: str | None = None) -> SidecarStatus:
        self.client.wait_until_ready(timeout)
        status = self.status()
        if weight_version is not None and status.weight_version != weight_version:
            raise RunError(f"the engine at {self.engine_url} serves weight version {status.weight_version!r}, not "
                           f"{weight_version!r}, and nothing can reload it (rollout.engine_url has no sidecar)")
        return status

    def load_weights(self, path: str, weight_version: str, sources: Sequence[WeightSource] = ()) -> SidecarStatus:
        if sources:
            raise RunError(f"the engine at {self.engine_url} (rollout.engine_url) has no sidecar to fetch weight "
                           "files from other nodes; give the run a sidecar (hybrid.sidecar_url)")
        self.client.update_weights_from_disk(path, weight_version=weight_version)
        return self._serving(weight_version, f"loading {weight_version!r}", Path(path))

    def weights_pushed(self, weight_version: str) -> SidecarStatus:
        return self._serving(weight_version, f"the push of {weight_version!r}", None)

    def _serving(self, weight_version: str, after: str, kept: Path | None) -> SidecarStatus:
        """Check the engine reports `weight_version`; like the sidecar, keep only the last loaded directory."""
        reported = self.client.weight_version()
        if reported != weight_version:
            raise EngineError(f"the engine at {self.engine_url} reports weight version {reported!r} after {after}")
        if self._kept is not None and self._kept != kept:
            shutil.rmtree(self._kept, ignore_errors=True)
        self._kept = kept
        return self.status()

    def release_memory(self, tags: list[str] | None = None) -> SidecarStatus:
        self.client.release_memory_occupation(tags)
        self._released |= set(tags or ("weights", "kv_cache", "cuda_graph"))
        return self.status()

    def resume_memory(self, tags: list[str] | None = None) -> SidecarStatus:
        tags = sorted(self._released) if tags is None else tags
        if tags:
            self.client.resume_memory_occupation(tags)
        self._released -= set(tags)
        return self.status()

    def close(self) -> None:
        """The engine is not ours to stop."""


class EngineControl:
    """What the driver does to the engine, phase by phase."""

    def __init__(self, control, config: Config, store: MetadataStore | None = None, owned: list | None = None,
                 engine_log: Path | None = None, pod_name: str | None = None):
        self.control = control  # a Sidecar, a SidecarClient or an ExternalEngine
        self.config = config
        self.store = store
        self.pod_name = pod_name  # whose leased sidecar record tells, when the sidecar does not answer
        self._owned = owned or []  # what close() stops: an in-process sidecar and its registration
        self.engine_log = engine_log  # where the engine logs, when this process started it
        self.lifecycle = config.hybrid.engine_lifecycle

    @classmethod
    def from_config(cls, config: Config, run_dir: Path, store: MetadataStore, index: int = 0) -> EngineControl:
        """Engine `index` of the run's `rollout.engines` (only an in-process sidecar's can be more than one)."""
        rollout, hybrid = config.rollout, config.hybrid
        if rollout.engine_url:
            if hybrid.engine_lifecycle == "restart":
                raise UserError("hybrid.engine_lifecycle=restart needs a sidecar to restart the engine; "
                                "unset rollout.engine_url (or use hybrid.sidecar_url)")
            client = EngineClient(rollout.engine_url, timeout=rollout.request_timeout_s,
                                  api_key=load_sidecar_token(hybrid))
            try:
                client.get_model_info()
            except EngineError as error:
                raise RunError(f"{error} (rollout.engine_url); start the engine there, or unset rollout.engine_url "
                               "to let the run start its own") from None
            return cls(ExternalEngine(client), config, store)
        if hybrid.sidecar_url:
            from megatron_rl.hybrid.sidecar_client import SidecarClient

            return cls(SidecarClient.from_config(hybrid, timeout=rollout.request_timeout_s), config, store,
                       pod_name=hybrid.pod_name)
        from megatron_rl.hybrid.sidecar import engine_log_path, sidecar_from_config
        from megatron_rl.hybrid.sidecar_metadata import SidecarRegistration

        sidecar = sidecar_from_config(config, run_dir, index=index).start()
        registration = SidecarRegistration(sidecar, lambda: store, run_name=config.control.run_name,
                                           lease_ttl_s=hybrid.sidecar_lease_ttl_s, close_store=False).start()
        return cls(sidecar, config, store, owned=[registration, sidecar], engine_log=engine_log_path(run_dir, index),
                   pod_name=sidecar.pod_name)

    @property
    def engine_url(self) -> str:
        return self.control.engine_url if hasattr(self.control, "engine_url") else self.control.status().engine_url

    def status(self) -> SidecarStatus:
        return self.control.status()

    def wait_ready(self, weight_version: str | None = None) -> SidecarStatus:
        try:
            return self.control.wait_ready(self.config.rollout.engine_start_timeout_s, weight_version)
        except (SidecarError, EngineError) as error:
            raise RunError(f"waiting for the engine failed: {self._describe(error)}") from None

    # --- the lifecycle around training ------------------------------------------------------------

    def release(self) -> None:
        """After rollout: hand the devices to the trainer."""
        self._do("releasing the engine", lambda: self.control.stop_engine() if self.lifecycle == "restart"
                 else self.control.release_memory(None))

    def prepare_for_weights(self) -> None:
        """Before a weight push: the engine's weight memory must exist (KV stays released)."""
        if self.lifecycle == "release" and "weights" in self.control.status().released_tags:
            self._do("resuming the engine's weights", lambda: self.control.resume_memory(["weights"]))

    def load(self, weights: SyncedWeights, servers: list[SidecarStatus], status: SidecarStatus | None = None) -> float:
        """Load a written weight version (a stopped engine loads it at start), fetching what this node's copy
        lacks from `servers` (weight_delivery.py), or record a pushed one, and check the engine serves it;
        returns the seconds it took. `status`: the sidecar's, if just asked (else it is asked here)."""
        started = time.monotonic()
        if weights.path is None:
            self._do(f"weight sync of version {weights.weight_version}",
                     lambda: self.control.weights_pushed(weights.weight_version))
        else:
            def load_from_disk() -> SidecarStatus:
                path, sources = plan_delivery(weights, status or self.control.status(), servers)
                return self.control.load_weights(path, weights.weight_version, sources)

            self._do(f"weight sync of version {weights.weight_version}", load_from_disk)
        return time.monotonic() - started

    def answered_status(self) -> SidecarStatus | None:
        """The sidecar's status, or None if it does not answer now (`load` then asks again, to report why)."""
        try:
            return self.control.status()
        except (SidecarError, EngineError):
            return None

    def resume(self, weight_version: str) -> None:
        """After the weight push: the rest of the engine's memory back, or the engine started again."""
        status = self.control.status()
        if status.state == "stopped":
            self._do("starting the engine", self.control.start_engine)
        elif status.released_tags:
            self._do("resuming the engine's memory", lambda: self.control.resume_memory(None))
        self.wait_ready(weight_version)

    def recover(self, weight_version: str) -> None:
        """After a request found the engine gone: wait until it is back (the sidecar restarts it and
        re-loads `weight_version`; a remote sidecar that is itself gone may be restarted with its pod's
        rollout container meanwhile), or fail the run with what is known (rollout.engine_start_timeout_s).
        Pushed weights (hybrid.weight_sync cuda_ipc or nccl) are gone with the engine: once it is back,
        `EngineLostWeights` asks the caller to push them again. (The master calls this only when no engine
        is up; while another is, it keeps the restarted one out until the next push reaches it.)"""
        if self.config.hybrid.weight_sync == "disk":
            self.wait_ready(weight_version)
            return
        status = self.wait_ready(None)
        if status.weight_version != weight_version:
            raise EngineLostWeights(f"the engine at {status.engine_url} restarted and lost weight version "
                                    f"{weight_version}, which the trainer pushed into it "
                                    f"(hybrid.weight_sync={self.config.hybrid.weight_sync})",
                                    weight_version=weight_version, url=status.engine_url)

    def close(self) -> None:
        for owned in self._owned:
            owned.close()

    def _do(self, what: str, operation) -> None:
        try:
            operation()
        except (SidecarError, EngineError) as error:
            raise RunError(f"{what} failed: {self._describe(error)}") from None

    def _describe(self, error: Exception) -> str:
        """The error, and whether the sidecar's leased record says it is alive."""
        message = str(error)
        if isinstance(error, SidecarUnavailable) and self.store is not None and self.pod_name is not None:
            key = sidecar_record_key(self.config.control.run_name, self.pod_name)
            try:
                alive = self.store.get(key) is not None
            except Exception as store_error:  # the store's own trouble is reported, not raised over this one
                return f"{message}; its record {key} could not be read ({store_error})"
            message += (f"; its record {key} is still there (the sidecar may be restarting)" if alive else
                        f"; its record {key} is gone: the sidecar's lease expired, so it is dead — restart the "
                        "pod's rollout container (megatron-rl sidecar)")
        return message


class EngineGroup:
    """The run's engines, each behind its EngineControl; every lifecycle step goes to all of them, in turn."""

    def __init__(self, controls: list[EngineControl]):
        self.controls = controls
        self._engine_urls: list[str] | None = None

    @classmethod
    def from_config(cls, config: Config, run_dir: Path, store: MetadataStore) -> EngineGroup:
        count = config.rollout.engines
        if count > 1 and (config.rollout.engine_url or config.hybrid.sidecar_url):
            where = "rollout.engine_url" if config.rollout.engine_url else "hybrid.sidecar_url"
            raise UserError(f"rollout.engines={count} starts that many engines in this run; {where} names one that "
                            f"runs elsewhere. Unset {where}, or set rollout.engines=1")
        if count > 1 and config.rollout.engine == "sglang":
            # Each would claim the same GPUs; SGLang spreads one server over its GPUs data-parallel itself.
            raise UserError(f"rollout.engines={count} is for the embedded engine; for data-parallel SGLang keep "
                            "rollout.engines=1 and pass --dp-size N in rollout.sglang_args")
        controls: list[EngineControl] = []
        try:  # every engine starts before any is waited for: they load their weights at once
            for index in range(count):
                controls.append(EngineControl.from_config(config, run_dir, store, index=index))
            if config.hybrid.peer_sidecar_urls:
                from megatron_rl.hybrid.sidecar_client import SidecarClient

                token = load_sidecar_token(config.hybrid)
                controls += [EngineControl(SidecarClient(url, token, config.rollout.request_timeout_s), config, store)
                             for url in config.hybrid.peer_sidecar_urls]
        except BaseException:
            for control in controls:
                control.close()
            raise
        return cls(controls)

    @property
    def engine_urls(self) -> list[str]:
        # Asked once: a remote sidecar tells its engine's (fixed) address only while it answers.
        if self._engine_urls is None:
            self._engine_urls = [control.engine_url for control in self.controls]
        return self._engine_urls

    @property
    def engine_logs(self) -> list[Path]:
        return [control.engine_log for control in self.controls if control.engine_log is not None]

    def statuses(self) -> list[SidecarStatus]:
        return [control.status() for control in self.controls]

    def wait_ready(self, weight_version: str | None = None) -> None:
        for control in self.controls:
            control.wait_ready(weight_version)

    def release(self) -> None:
        for control in self.controls:
            control.release()

    def prepare_for_weights(self) -> None:
        for control in self.controls:
            control.prepare_for_weights()

    def load(self, weights: SyncedWeights) -> None:
        """Every engine loads (or records) the version; `weights.load_seconds` is their total."""
        statuses = [None] * len(self.controls)
        if weights.path is not None:  # asked once: where each engine loads from, and whom others fetch from
            statuses = [control.answered_status() for control in self.controls]
        servers = [status for status in statuses if status is not None and status.control_url is not None]
        weights.load_seconds = sum(control.load(weights, servers, status)
                                   for control, status in zip(self.controls, statuses))

    def resume(self, weight_version: str) -> None:
        for control in self.controls:
            control.resume(weight_version)

    def recover(self, engine_url: str, weight_version: str) -> None:
        """The engine at `engine_url` is gone and no other is up: wait for it (EngineControl.recover)."""
        self.controls[self.engine_urls.index(engine_url)].recover(weight_version)

    def close(self) -> None:
        for control in self.controls:
            control.close()
