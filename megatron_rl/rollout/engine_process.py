"""Start, watch and stop an engine server process: the embedded engine (CPU) or SGLang (GPU).

The RL loop starts an embedded one when no `rollout.engine_url` is given; the sidecar owns one per pod.
The server is a real child process speaking SGLang's HTTP API (on loopback unless `rollout.engine_host`
says otherwise, for a driver on another pod; then with an API key), so the code that talks to it is the
code that talks to SGLang. Both kinds share `EngineProcess`; they differ only in the command line and the
environment they are started with.

Engine processes die with the process that started them (Linux `PR_SET_PDEATHSIG`), so a killed sidecar
or driver leaves no orphan engine holding GPU memory. The kernel ties that signal to the *thread* that
forked the child, so every engine is forked from one long-lived spawner thread, never from a worker
thread that may exit (uvicorn's thread pool retires idle threads).
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from megatron_rl.errors import UserError
from megatron_rl.net import free_port
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError

__all__ = [
    "EmbeddedEngineProcess", "EngineProcess", "EngineStartError", "SGLangEngineProcess", "check_sglang_args",
    "sglang_environment",
]

ENGINE_HOST = "127.0.0.1"  # by default engines are reached only by the sidecar and the rollout code of their pod

# Flags the SGLang command line sets itself; rollout.sglang_args must not repeat them.
SGLANG_MANAGED_FLAGS = ("--model-path", "--model", "--host", "--port", "--load-format", "--enable-memory-saver",
                        "--api-key")


def engine_url(host: str, port: int, advertise_host: str | None = None) -> str:
    """Where an engine listening on `host`:`port` is reached: at `advertise_host` when given (the name other
    pods resolve), else at `host` (loopback for a wildcard address)."""
    reachable = advertise_host or ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
    return f"http://{'[' + reachable + ']' if ':' in reachable else reachable}:{port}"


def _listen_args(host: str, port: int, api_key: str | None) -> list[str]:
    return ["--host", host, "--port", str(port), *(("--api-key", api_key) if api_key else ())]


class EngineStartError(RuntimeError):
    """The engine process exited or did not become healthy in time; the message holds its log tail."""


# --------------------------------------------------------------------------------------------- spawning

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A `preexec_fn` asking the kernel to SIGKILL the child when its parent dies."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died between fork and prctl
                os._exit(1)

    return preexec


class _Spawner:
    """One daemon thread that forks every engine process (see the module docstring for why)."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="engine-spawner", daemon=True)
                self._thread.start()
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._requests.put((command, env, log_path, reply))
        outcome = reply.get()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _run(self) -> None:
        while True:
            command, env, log_path, reply = self._requests.get()
            try:
                with open(log_path, "ab") as log:
                    # Its own session: a terminal's Ctrl-C reaches only us, and we stop the engine in order.
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=env, start_new_session=True,
                                               preexec_fn=_die_with_parent(os.getpid()))
                reply.put(process)
            except BaseException as error:  # handed to the caller, which raises it
                reply.put(error)


_spawner = _Spawner()


# --------------------------------------------------------------------------------------------- processes


class EngineProcess:
    """One engine server as a child process on `host`:`port` (`url`: where it is reached; `api_key`: what
    it asks of every request but /health), its output appended to `log_path`."""

    kind = "engine"

    def __init__(self, command: list[str], env: dict[str, str], port: int, log_path: Path, *,
                 host: str = ENGINE_HOST, advertise_host: str | None = None, api_key: str | None = None):
        self.command = command
        self.env = env
        self.port = port
        self.url = engine_url(host, port, advertise_host)
        self.api_key = api_key
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self._group_stopped = False

    def start(self, timeout: float = 300.0) -> EngineClient:
        """Start the server and wait until it is ready; return a client for it.

        Ready: `/health` answers 200 (SGLang: 503 until its warm-up is done), then one 1-token generation
        (`/health_generate`) succeeds, which a fresh engine (neither paused nor released) can always serve.
        """
        if self.alive():
            raise RuntimeError(f"the engine at {self.url} (PID {self.pid}) is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._group_stopped = False
        self.process = _spawner.popen(self.command, self.env, self.log_path)
        client = EngineClient(self.url, timeout=30, api_key=self.api_key)
        deadline = time.monotonic() + timeout
        probe = client.health
        while True:
            if self.process.poll() is not None:
                raise EngineStartError(f"the {self.kind} engine process exited with code {self.process.returncode} "
                                       f"before it was ready; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if probe():
                    if probe == client.health_generate:
                        return client
                    probe = client.health_generate
                    continue
            except EngineError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(f"the {self.kind} engine at {self.url} was not ready after {timeout:.0f} s; "
                                       f"its log ({self.log_path}) ends with:\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the engine's process group (SGLang has scheduler subprocesses), SIGKILL after `timeout` s.
        After a crash of the server process, what is left of its group (GPU memory holders) is killed."""
        if self.process is None or self._group_stopped:
            return
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        # Once only: a process group id is free for reuse when the group is empty.
        self._group_stopped = True

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class EmbeddedEngineProcess(EngineProcess):
    """`python -m megatron_rl.rollout.embedded_server` (the CPU engine)."""

    kind = "embedded"

    def __init__(self, model: str | Path, log_path: Path, *, port: int | None = None,
                 load_format: str = "dummy", max_running_requests: int = 64, extra_args: tuple[str, ...] = (),
                 host: str = ENGINE_HOST, advertise_host: str | None = None, api_key: str | None = None):
        self.model = str(model)
        port = port or free_port()
        command = [
            sys.executable, "-m", "megatron_rl.rollout.embedded_server", "--model", self.model,
            *_listen_args(host, port, api_key), "--load-format", load_format,
            "--max-running-requests", str(max_running_requests), *extra_args,
        ]
        super().__init__(command, dict(os.environ), port, log_path, host=host, advertise_host=advertise_host,
                         api_key=api_key)


def sglang_environment(base: dict[str, str]) -> dict[str, str]:
    """The environment of an SGLang server in a colocated RL pod (reference/lessons-from-peers.md):

    - SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false: `/health` must not run a forward pass, which would
      touch unmapped memory while weights or KV cache are released, and time out while paused.
    - NCCL_CUMEM_ENABLE=0: must match the trainer's setting for CUDA-IPC weight sync.
    - NCCL_GRAPH_REGISTER=0: NCCL's graph buffer registration goes stale when a released CUDA-graph pool is
      resumed at the same addresses, and the next replay hangs (torch_memory_saver #88).
    - no `expandable_segments` in PYTORCH_CUDA_ALLOC_CONF: expandable segments break CUDA IPC handles.
    """
    env = dict(base)
    env["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] = "false"
    env["NCCL_CUMEM_ENABLE"] = "0"
    env["NCCL_GRAPH_REGISTER"] = "0"
    alloc_options = [option for option in env.pop("PYTORCH_CUDA_ALLOC_CONF", "").split(",")
                     if option.strip() and not option.strip().startswith("expandable_segments")]
    if alloc_options:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(alloc_options)
    return env


def check_sglang_args(sglang_args: list[str] | tuple[str, ...]) -> None:
    """rollout.sglang_args must not set what the SGLang command line sets itself."""
    for argument in sglang_args:
        flag = argument.split("=", 1)[0]
        if flag in SGLANG_MANAGED_FLAGS:
            raise UserError(f"rollout.sglang_args: {flag} is set by the sidecar itself (it starts SGLang with "
                            f"{', '.join(SGLANG_MANAGED_FLAGS)}); remove it from rollout.sglang_args")


class SGLangEngineProcess(EngineProcess):
    """`python -m sglang.launch_server` with random (dummy) weights and the memory saver, so the first
    weights come from `update_weights_from_disk` and memory can be released between rollouts."""

    kind = "sglang"

    def __init__(self, model: str | Path, log_path: Path, *, port: int | None = None,
                 sglang_args: list[str] | tuple[str, ...] = (), python: str = sys.executable,
                 base_env: dict[str, str] | None = None, host: str = ENGINE_HOST, advertise_host: str | None = None,
                 api_key: str | None = None):
        check_sglang_args(sglang_args)
        self.model = str(model)
        port = port or free_port()
        command = [
            python, "-m", "sglang.launch_server", "--model-path", self.model, *_listen_args(host, port, api_key),
            "--load-format", "dummy", "--enable-memory-saver", *sglang_args,
        ]
        env = sglang_environment(dict(os.environ) if base_env is None else base_env)
        super().__init__(command, env, port, log_path, host=host, advertise_host=advertise_host, api_key=api_key)
