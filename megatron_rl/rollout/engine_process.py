"""Start, watch and stop an engine server process (the embedded engine on CPU).

The RL loop starts one when no `rollout.engine_url` is given; the sidecar will own one per pod.
The server is a real child process speaking SGLang's HTTP API on a loopback port, so the code that
talks to it is the code that talks to SGLang.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_rl.net import free_port
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError


class EngineStartError(RuntimeError):
    """The engine process exited or did not become healthy in time; the message holds its log tail."""


class EmbeddedEngineProcess:
    """`megatron-rl engine serve` as a child process on 127.0.0.1, its output in `log_path`."""

    def __init__(self, model: str | Path, log_path: Path, *, port: int | None = None,
                 load_format: str = "dummy", max_running_requests: int = 64, extra_args: tuple[str, ...] = ()):
        self.model = str(model)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            sys.executable, "-m", "megatron_rl.rollout.embedded_server", "--model", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--load-format", load_format,
            "--max-running-requests", str(max_running_requests), *extra_args,
        ]
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> EngineClient:
        """Start the server and wait until `/health` answers; return a client for it."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # Its own session: a terminal's Ctrl-C reaches us, and we stop the engine in order.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=dict(os.environ))
        client = EngineClient(self.url, timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise EngineStartError(f"the engine process exited with code {self.process.returncode} before it was "
                                       f"ready; its log ({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if client.health():
                    return client
            except EngineError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EngineStartError(f"the engine at {self.url} was not ready after {timeout:.0f} s; its log "
                                       f"({self.log_path}) ends with:\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_bytes()[-chars:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedEngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
