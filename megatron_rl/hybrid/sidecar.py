"""The sidecar: owns one inference engine process (SGLang on GPU, the embedded engine on CPU) of a pod.

It starts the engine with random weights, loads each weight version the trainer hands it (HF
safetensors directories, `update_weights_from_disk`), releases and resumes the engine's memory between
rollouts, and restarts the engine when it crashes or when asked to (k1.5's `hybrid.engine_lifecycle=
restart`). Rollout code talks to the engine directly at `engine_url`; the sidecar only controls it.

`Sidecar` is the core (no HTTP). `SidecarControl` is what the RL driver uses: a `Sidecar` in process
(the embedded default) or a `SidecarClient` over HTTP (a pod's rollout container), the same way.

Behaviour:
- Weight retention: the directory of the last loaded version is kept, so an engine restart re-loads it;
  the previously kept one is deleted once a newer version has loaded (the sidecar owns directories
  handed to `load_weights`). A restart is ready only once the engine reports that version again.
  Weights the trainer pushed into the engine itself (`weights_pushed`: CUDA IPC or NCCL) cannot be
  re-loaded: an engine restarted after them serves no version until the trainer pushes again.
- Other nodes' weight files: `load_weights` given `sources` first fetches what this node's copy lacks from
  those pods' sidecars (weight_delivery.py); `megatron-rl sidecar` serves this node's copies to them.
- Crashes: a monitor thread notices the engine exiting unexpectedly, restarts it on the same port (the
  URL stays valid), re-loads the kept version, re-releases the memory that was released, and reports
  ready with `restarts + 1`; past `max_engine_restarts` it reports failed with the engine's log tail.
- Engine operations are serialised; `status()` and `wait_ready()` never wait for one.
"""
from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Protocol, Sequence

from megatron_rl.errors import UserError
from megatron_rl.hybrid.sidecar_protocol import (
    SIDECAR_TOKEN_ENV, CommandResult, EngineKind, SidecarCommand, SidecarError, SidecarFailed, SidecarRequestError,
    SidecarState, SidecarStateError, SidecarStatus, SidecarTimeout, SidecarUnavailable, WeightSource, check_pod_name,
    load_sidecar_token, utc_now,
)
from megatron_rl.hybrid.weight_delivery import fetch_weight_files
from megatron_rl.net import free_port, is_loopback
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.engine_process import (
    ENGINE_HOST, EmbeddedEngineProcess, EngineProcess, EngineStartError, SGLangEngineProcess, check_sglang_args,
    engine_url,
)
from megatron_rl.rollout.protocol import MEMORY_TAGS, EngineError

if TYPE_CHECKING:
    from megatron_rl.config import Config

__all__ = ["Sidecar", "SidecarControl", "sidecar_from_config"]

_log = logging.getLogger(__name__)

EngineFactory = Callable[[int], EngineProcess]  # port → a not yet started engine process
PROBE_TIMEOUT_S = 5.0  # bound on the /health probe of wait_ready


class SidecarControl(Protocol):
    """The sidecar's operations, in process (`Sidecar`) or over HTTP (`SidecarClient`).

    Errors are `SidecarError`s: SidecarRequestError (bad input), SidecarStateError (not allowed now),
    SidecarUnavailable (the engine cannot do it now), SidecarFailed (the engine is given up on),
    SidecarTimeout (`wait_ready`).
    """

    def status(self) -> SidecarStatus: ...

    def wait_ready(self, timeout: float, weight_version: str | None = None) -> SidecarStatus:
        """Block until the engine is ready (and serves `weight_version`, if given)."""

    def weights_pushed(self, weight_version: str) -> SidecarStatus:
        """The trainer pushed `weight_version` into the engine itself: check the engine reports it, record it."""

    def load_weights(self, path: str, weight_version: str, sources: Sequence[WeightSource] = ()) -> SidecarStatus:
        """Fetch into the HF safetensors directory `path` the files `sources` name (other pods' copies), load
        it as `weight_version` and check the engine reports it. With the engine stopped, only keep it:
        `start_engine` loads it."""

    def release_memory(self, tags: list[str] | None = None) -> SidecarStatus:
        """Release `tags` (None: all); each must not be released already. The engine must be idle."""

    def resume_memory(self, tags: list[str] | None = None) -> SidecarStatus:
        """Resume `tags` (None: every released one); each must be released."""

    def restart_engine(self) -> SidecarStatus:
        """Stop the engine, start it again and re-load the kept weight version."""

    def stop_engine(self) -> SidecarStatus:
        """Stop the engine, freeing all its memory (k1.5's lifecycle between rollouts)."""

    def start_engine(self) -> SidecarStatus:
        """Start a stopped (or failed) engine and load the kept weight version."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class _KeptWeights:
    path: Path | None  # None: pushed into the engine by the trainer, nothing on disk to re-load
    weight_version: str


class _StartFailed(Exception):
    """One attempt to bring the engine up failed; the message says why (with the engine's log tail)."""


class Sidecar:
    """Owns one engine process. Thread-safe; `start()` brings the engine up in the background."""

    def __init__(self, make_engine: EngineFactory, *, pod_name: str, engine_kind: EngineKind,
                 engine_port: int | None = None, max_engine_restarts: int = 5, start_timeout_s: float = 300.0,
                 control_timeout_s: float = 600.0, monitor_interval_s: float = 0.2, engine_host: str = ENGINE_HOST,
                 advertise_host: str | None = None, api_key: str | None = None, shm_dir: str | None = None,
                 token: str | None = None):
        self.pod_name = check_pod_name(pod_name)
        self.engine_kind = engine_kind
        self.engine_port = engine_port or free_port()
        # `make_engine` starts the engine listening on engine_host (with api_key), reached at this URL.
        self.engine_url = engine_url(engine_host, self.engine_port, advertise_host)
        self.api_key = api_key
        # Weight files: where this node's copies are (hybrid.shm_dir), the token other pods' sidecars ask
        # for when this one fetches from them, and the URL they fetch from this one at (set by serve()).
        self.host = socket.gethostname()
        self.shm_dir = str(Path(shm_dir).resolve()) if shm_dir is not None else None
        self.token = token
        self.control_url: str | None = None
        self.max_engine_restarts = max_engine_restarts
        self.start_timeout_s = start_timeout_s
        self.control_timeout_s = control_timeout_s
        self.monitor_interval_s = monitor_interval_s
        self._make_engine = make_engine
        self._probe = EngineClient(self.engine_url, timeout=PROBE_TIMEOUT_S, api_key=api_key)
        # _changed guards the fields below and wakes wait_ready; _operation serialises engine operations.
        self._changed = threading.Condition()
        self._operation = threading.RLock()
        self._engine: EngineProcess | None = None
        self._client: EngineClient | None = None
        self._expect_running = False  # the engine should be alive: its exit is a crash
        self._state: SidecarState = "stopped"
        self._restarts = 0
        self._released: list[str] = []
        self._kept: _KeptWeights | None = None
        self._last_error: str | None = None
        self._last_command: CommandResult | None = None
        self._updated_at = utc_now()
        self._listeners: list[Callable[[SidecarStatus], None]] = []
        self._closed = False
        self._wake = threading.Event()
        self._monitor: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"Sidecar(pod={self.pod_name!r}, engine={self.engine_kind}, url={self.engine_url!r})"

    # ------------------------------------------------------------------ status

    def _snapshot_locked(self) -> SidecarStatus:
        engine = self._engine
        return SidecarStatus(
            pod_name=self.pod_name, engine=self.engine_kind, state=self._state, engine_url=self.engine_url,
            engine_pid=engine.pid if engine is not None and engine.alive() else None,
            weight_version=self._kept.weight_version if self._kept else None, restarts=self._restarts,
            released_tags=list(self._released), last_error=self._last_error, last_command=self._last_command,
            updated_at=self._updated_at, host=self.host, shm_dir=self.shm_dir, control_url=self.control_url)

    def _update(self, **fields) -> None:
        """Set fields (`state`, `restarts`, `released`, `kept`, `last_error`, `last_command`), wake waiters
        and tell the listeners."""
        with self._changed:
            for name, value in fields.items():
                setattr(self, "_" + name, value)
            self._updated_at = utc_now()
            snapshot = self._snapshot_locked()
            listeners = list(self._listeners)
            self._changed.notify_all()
        for listener in listeners:
            try:
                listener(snapshot)
            except Exception:
                _log.exception("sidecar status listener %r failed", listener)

    def add_listener(self, listener: Callable[[SidecarStatus], None]) -> None:
        """Call `listener(status)` after every change (keep it short: it runs on the changing thread)."""
        with self._changed:
            self._listeners.append(listener)

    def _engine_died_locked(self) -> bool:
        return self._expect_running and self._engine is not None and not self._engine.alive()

    def _notice_crash_locked(self) -> None:
        """A dead engine is reported as restarting at once, not after the monitor's next tick, so no caller
        sees "ready" for an engine that is gone."""
        if self._state == "ready" and self._engine_died_locked():
            self._state = "restarting"
            self._updated_at = utc_now()
            self._wake.set()

    def status(self) -> SidecarStatus:
        with self._changed:
            self._notice_crash_locked()
            return self._snapshot_locked()

    def wait_ready(self, timeout: float, weight_version: str | None = None) -> SidecarStatus:
        """Ready means: state ready, at `weight_version` if given, and the engine answers `/health` now. The
        probe closes the gap between an engine's death (its connections reset) and its exit being seen."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                self._notice_crash_locked()
                status = self._snapshot_locked()
                if status.state == "failed":
                    raise SidecarFailed(f"sidecar {self.pod_name}: the engine has failed: {status.last_error}")
                candidate = status.state == "ready" and weight_version in (None, status.weight_version)
                remaining = deadline - time.monotonic()
                if not candidate and remaining > 0:
                    # Bounded wait: a crash shows up as a dead process, not as a notification.
                    self._changed.wait(min(remaining, self.monitor_interval_s))
                    continue
            if candidate and self._engine_answers():
                return status
            if remaining <= 0:
                wanted = f" at weight version {weight_version!r}" if weight_version is not None else ""
                hint = f" (the engine at {self.engine_url} does not answer /health)" if candidate else \
                    _state_hint(status.state)
                raise SidecarTimeout(f"sidecar {self.pod_name}: the engine was not ready{wanted} after {timeout:g} s: "
                                     f"state {status.state}, weight version {status.weight_version!r}{hint}")
            time.sleep(self.monitor_interval_s)

    def _engine_answers(self) -> bool:
        try:
            return self._probe.health()
        except EngineError:
            return False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Sidecar:
        """Start the engine and the crash monitor in the background; `wait_ready` to block until ready."""
        with self._changed:
            if self._monitor is not None:
                raise RuntimeError(f"{self!r} was already started")
            self._state = "starting"
            self._monitor = threading.Thread(target=self._supervise, name=f"sidecar-{self.pod_name}", daemon=True)
        self._monitor.start()
        return self

    def _supervise(self) -> None:
        with self._operation:
            if not self._closed:
                self._bring_up("starting")
        while not self._closed:
            self._wake.wait(self.monitor_interval_s)
            self._wake.clear()
            with self._changed:
                died = self._engine_died_locked()
            if died:
                with self._operation:
                    with self._changed:
                        died = self._engine_died_locked() and not self._closed
                    if died:
                        self._recover_from_crash()

    def _recover_from_crash(self) -> None:
        engine = self._engine
        self._restart_after(f"the {self.engine_kind} engine (PID {engine.pid}) exited unexpectedly with code "
                            f"{engine.returncode}; its log ({engine.log_path}) ends with:\n{engine.log_tail()}")

    def _restart_after(self, message: str) -> None:
        """The engine crashed or is in an unknown state: restart it (counted), or give up past the limit."""
        _log.warning("sidecar %s: %s", self.pod_name, message)
        self._stop_process()
        if self._restarts >= self.max_engine_restarts:
            self._give_up(message)
            return
        self._update(state="restarting", restarts=self._restarts + 1, last_error=message)
        self._bring_up("restarting")

    def _give_up(self, message: str) -> None:
        """Called with the engine stopped."""
        self._update(state="failed", last_error=f"gave up after {self._restarts} restart(s) "
                                                f"(hybrid.max_engine_restarts={self.max_engine_restarts}): {message}")
        _log.error("sidecar %s: the engine has failed", self.pod_name)

    def _bring_up(self, state: SidecarState) -> None:
        """Start the engine as `state`, retrying failed starts until max_engine_restarts (then failed)."""
        self._update(state=state)
        while not self._closed:
            try:
                self._start_once()
                self._update(state="ready")
                return
            except _StartFailed as error:
                if self._closed:  # close() stopped the engine under us
                    return
                _log.warning("sidecar %s: %s", self.pod_name, error)
                self._stop_process()
                if self._restarts >= self.max_engine_restarts:
                    self._give_up(str(error))
                    return
                self._update(state="restarting", restarts=self._restarts + 1, last_error=str(error))

    def _start_once(self) -> None:
        """A fresh engine process, the kept weights loaded into it and the released memory released again."""
        engine = self._make_engine(self.engine_port)
        with self._changed:
            self._engine = engine
            self._expect_running = True
        try:
            engine.start(timeout=self.start_timeout_s)
        except EngineStartError as error:
            raise _StartFailed(str(error)) from None
        self._client = EngineClient(engine.url, timeout=self.control_timeout_s, api_key=self.api_key)
        try:
            if self._kept is not None and self._kept.path is None:
                _log.warning("the restarted engine lost pushed weight version %r; it serves none until the trainer "
                             "pushes again", self._kept.weight_version)
                self._update(kept=None)
            elif self._kept is not None:
                self._load_into_engine(self._kept.path, self._kept.weight_version)
            if self._released:
                self._client.release_memory_occupation(list(self._released))
        except (EngineError, SidecarError) as error:
            raise _StartFailed(f"the {self.engine_kind} engine started but could not be restored: {error}; its log "
                               f"({engine.log_path}) ends with:\n{engine.log_tail()}") from None

    def _stop_process(self) -> None:
        with self._changed:
            self._expect_running = False
            engine = self._engine
        if engine is not None:
            engine.stop()

    def _load_into_engine(self, path: Path, weight_version: str) -> None:
        self._client.update_weights_from_disk(str(path), weight_version=weight_version)
        reported = self._client.weight_version()
        if reported != weight_version:
            raise SidecarUnavailable(f"the engine at {self.engine_url} reports weight version {reported!r} after "
                                     f"loading version {weight_version!r} from {path}")

    # ------------------------------------------------------------------ operations

    def _require_running(self, operation: str) -> None:
        """Raise unless the engine is up; called holding `_operation`."""
        with self._changed:
            if self._closed:
                raise SidecarStateError(f"{operation}: the sidecar is closed")
            self._notice_crash_locked()
            state = self._state
            last_error = self._last_error
        if state == "failed":
            raise SidecarFailed(f"{operation}: the engine has failed: {last_error}")
        if state == "stopped":
            raise SidecarStateError(f"{operation}: the engine is stopped; call start_engine first")
        if state != "ready":
            raise SidecarUnavailable(f"{operation}: the engine is {state} (it crashed); wait_ready, then retry")

    def _engine_error(self, operation: str, error: EngineError, refused: type[SidecarError]) -> SidecarError:
        """An engine failure as a SidecarError: `refused` when the engine answered 400, else unavailable."""
        if error.status == 400:
            return refused(f"{operation}: the engine refused: {error.server_message or error}")
        return SidecarUnavailable(f"{operation}: {error}")

    def load_weights(self, path: str, weight_version: str, sources: Sequence[WeightSource] = ()) -> SidecarStatus:
        if not weight_version:
            raise SidecarRequestError("weight_version: must be a non-empty string")
        directory = Path(path)
        if sources:  # no engine operation: status stays answerable while GBs arrive
            fetch_weight_files(directory, list(sources), self.token, self.control_timeout_s)
        if not directory.is_dir():
            raise SidecarRequestError(f"path: {path} is not a directory; pass the HF safetensors directory of "
                                      f"weight version {weight_version!r}, readable by the sidecar")
        with self._operation:
            with self._changed:
                stopped = self._state == "stopped" and not self._closed
            if stopped:
                self._keep(directory, weight_version)
                return self.status()
            self._require_running("load_weights")
            if "weights" in self._released:
                raise SidecarStateError("load_weights: the engine's weights are released; "
                                        "resume_memory(['weights']) first")
            try:
                self._load_into_engine(directory, weight_version)
            except (EngineError, SidecarError) as error:
                with self._changed:
                    crashed = self._engine_died_locked()
                if crashed:  # the monitor restarts it with the kept version
                    kept = self._kept.weight_version if self._kept else None
                    raise SidecarUnavailable(f"load_weights of {path}: the engine crashed ({error}); it is being "
                                             f"restarted with weight version {kept!r}; wait_ready, then retry"
                                             ) from None
                self._restore_kept_weights()
                if isinstance(error, EngineError):
                    raise self._engine_error(f"load_weights of {path}", error, SidecarRequestError) from None
                raise
            self._keep(directory, weight_version)
            return self.status()

    def weights_pushed(self, weight_version: str) -> SidecarStatus:
        if not weight_version:
            raise SidecarRequestError("weight_version: must be a non-empty string")
        with self._operation:
            self._require_running("weights_pushed")
            try:
                reported = self._client.weight_version()
            except EngineError as error:
                raise self._engine_error("weights_pushed", error, SidecarRequestError) from None
            if reported != weight_version:
                raise SidecarRequestError(f"weights_pushed: the engine reports weight version {reported!r}, not "
                                          f"{weight_version!r}; push the weights before reporting them")
            self._keep(None, weight_version)
            return self.status()

    def _keep(self, directory: Path | None, weight_version: str) -> None:
        previous = self._kept
        self._update(kept=_KeptWeights(directory, weight_version))
        if previous is not None and previous.path is not None and (
                directory is None or previous.path.resolve() != directory.resolve()):
            shutil.rmtree(previous.path, ignore_errors=True)

    def _restore_kept_weights(self) -> None:
        """After a failed load the engine may hold a mix of versions (SGLang rolls back to its start-up
        weights): load the kept version again, or restart the engine if even that fails."""
        if self._kept is None or self._kept.path is None:
            return
        try:
            self._load_into_engine(self._kept.path, self._kept.weight_version)
        except (EngineError, SidecarError) as error:
            self._restart_after(f"re-loading weight version {self._kept.weight_version!r} after a failed load "
                                f"failed ({error})")

    def release_memory(self, tags: Iterable[str] | None = None) -> SidecarStatus:
        tags = _check_tags(tags, default=MEMORY_TAGS)
        with self._operation:
            self._require_running("release_memory")
            already = [tag for tag in tags if tag in self._released]
            if already:
                raise SidecarStateError(f"tags: {already[0]!r} is already released (released_tags: "
                                        f"{', '.join(self._released)})")
            try:
                self._client.release_memory_occupation(tags)
            except EngineError as error:
                raise self._engine_error(f"release_memory {tags}", error, SidecarStateError) from None
            self._update(released=[tag for tag in MEMORY_TAGS if tag in self._released or tag in tags])
            return self.status()

    def resume_memory(self, tags: Iterable[str] | None = None) -> SidecarStatus:
        with self._operation:
            tags = _check_tags(tags, default=self._released)
            self._require_running("resume_memory")
            missing = [tag for tag in tags if tag not in self._released]
            if missing:
                raise SidecarStateError(f"tags: {missing[0]!r} is not released (released_tags: "
                                        f"{', '.join(self._released) or 'none'})")
            if tags:
                try:
                    self._client.resume_memory_occupation(tags)
                except EngineError as error:
                    raise self._engine_error(f"resume_memory {tags}", error, SidecarStateError) from None
                self._update(released=[tag for tag in self._released if tag not in tags])
            return self.status()

    def restart_engine(self) -> SidecarStatus:
        with self._operation:
            self._check_open("restart_engine")
            self._stop_process()
            self._bring_up("restarting")
            return self._status_after("restart_engine")

    def stop_engine(self) -> SidecarStatus:
        with self._operation:
            self._check_open("stop_engine")
            self._stop_process()
            self._update(state="stopped", released=[])
            return self.status()

    def start_engine(self) -> SidecarStatus:
        with self._operation:
            self._check_open("start_engine")
            with self._changed:
                running = self._state == "ready" and not self._engine_died_locked()
            if not running:
                self._stop_process()  # a failed engine's leftovers
                self._bring_up("starting")
            return self._status_after("start_engine")

    def _check_open(self, operation: str) -> None:
        if self._closed:
            raise SidecarStateError(f"{operation}: the sidecar is closed")

    def _status_after(self, operation: str) -> SidecarStatus:
        status = self.status()
        if status.state == "failed":
            raise SidecarFailed(f"{operation}: the engine has failed: {status.last_error}")
        return status

    def execute(self, command: SidecarCommand) -> CommandResult:
        """Run an operator's command and record the outcome in the status (`last_command`)."""
        operations = {
            "stop_engine": self.stop_engine, "start_engine": self.start_engine,
            "restart_engine": self.restart_engine,
            "release_memory": lambda: self.release_memory(command.tags),
            "resume_memory": lambda: self.resume_memory(command.tags),
        }
        try:
            status = operations[command.op]()
            ok, message = True, f"{command.op} done: state {status.state}, weight version {status.weight_version!r}"
        except SidecarError as error:
            ok, message = False, f"{command.op} failed: {error}"
        result = CommandResult(id=command.id, op=command.op, ok=ok, message=message, finished_at=utc_now())
        self.record_command(result)
        return result

    def record_command(self, result: CommandResult) -> None:
        """Acknowledge an operator's command in the status."""
        _log.info("sidecar %s: command %s: %s", self.pod_name, result.id, result.message)
        self._update(last_command=result)

    def close(self) -> None:
        """Stop the engine and the monitor, and delete the kept weights. Idempotent."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._expect_running = False
        self._wake.set()
        self._stop_process()  # first, so an operation in flight fails fast instead of being waited for
        with self._operation:
            self._stop_process()  # an engine that operation may have started meanwhile
            kept, self._kept = self._kept, None
            if kept is not None and kept.path is not None:
                shutil.rmtree(kept.path, ignore_errors=True)
            self._update(state="stopped", released=[])
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join()

    def __enter__(self) -> Sidecar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_tags(tags: Iterable[str] | None, default: Iterable[str]) -> list[str]:
    if tags is None:
        return list(default)
    tags = list(tags)
    unknown = [tag for tag in tags if tag not in MEMORY_TAGS]
    if unknown:
        raise SidecarRequestError(f"tags: unknown memory tag {unknown[0]!r}; use {', '.join(MEMORY_TAGS)}")
    return list(dict.fromkeys(tags))


def _state_hint(state: SidecarState) -> str:
    return {"stopped": " (call start_engine)", "restarting": " (still restarting)",
            "starting": " (still starting; see the engine log)"}.get(state, "")


def engine_log_path(log_dir: Path, index: int = 0) -> Path:
    """Where engine `index` of a run's `rollout.engines` logs (the first: engine.log)."""
    return Path(log_dir) / ("engine.log" if index == 0 else f"engine-{index}.log")


def sidecar_from_config(config: Config, log_dir: Path, *, engine_port: int | None = None, index: int = 0) -> Sidecar:
    """A sidecar for model.hf_path served by rollout.engine, with hybrid.* settings; its engine log is
    `log_dir/engine.log`. Engine `index` > 0 of a run's `rollout.engines` logs to engine-INDEX.log and is
    named POD-INDEX in the run's metadata. Call `start()` on it."""
    from megatron_rl.hf_checkpoint import resolve_hf_dir

    if config.model.hf_path is None:
        raise UserError("model.hf_path is not set; the sidecar serves that model (an HF directory or builtin:NAME)")
    model_dir = resolve_hf_dir(config.model.hf_path)
    rollout = config.rollout
    log_path = engine_log_path(log_dir, index)
    # SGLang's flag for batch-invariant kernels; the embedded engine takes the same one.
    deterministic = ("--enable-deterministic-inference",) if rollout.deterministic_inference else ()
    hybrid = config.hybrid
    token = load_sidecar_token(hybrid)
    # Beyond loopback (a driver on another pod) the engine asks for the sidecar's token as its API key.
    api_key = None
    if not is_loopback(rollout.engine_host):
        api_key = token
        if api_key is None:
            raise UserError(f"rollout.engine_host={rollout.engine_host} is not a loopback address, and there is no "
                            f"token for the engine's API key: set hybrid.sidecar_token_file (or env {SIDECAR_TOKEN_ENV}), "
                            "or keep rollout.engine_host=127.0.0.1")
    listen = {"host": rollout.engine_host, "advertise_host": hybrid.advertise_host, "api_key": api_key}
    if rollout.engine == "sglang":
        check_sglang_args(rollout.sglang_args)

        def make_engine(port: int) -> EngineProcess:
            return SGLangEngineProcess(model_dir, log_path, port=port, sglang_args=[*rollout.sglang_args, *deterministic],
                                       **listen)
    else:
        def make_engine(port: int) -> EngineProcess:
            return EmbeddedEngineProcess(model_dir, log_path, port=port, extra_args=deterministic,
                                         max_running_requests=rollout.engine_max_running_requests, **listen)

    pod_name = hybrid.pod_name if index == 0 else f"{hybrid.pod_name}-{index}"
    return Sidecar(make_engine, pod_name=pod_name, engine_kind=rollout.engine, engine_port=engine_port,
                   max_engine_restarts=hybrid.max_engine_restarts, start_timeout_s=rollout.engine_start_timeout_s,
                   control_timeout_s=rollout.request_timeout_s, engine_host=rollout.engine_host,
                   advertise_host=hybrid.advertise_host, api_key=api_key, shm_dir=hybrid.shm_dir, token=token)
