"""Shared fixtures for engine tests: tiny HF models and a real embedded-engine server subprocess.

Import the fixtures into a test module: `from engine_fixtures import engine_client, engine_server, ...`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_rl.rollout import EngineClient, EngineError
from tiny_models import write_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
ENGINE_FAMILY = "qwen3"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class EngineServer:
    """`python -m megatron_rl.rollout.embedded_server` on a free 127.0.0.1 port, as a real subprocess."""

    def __init__(self, model_dir: Path, log_path: Path, *extra_args: str):
        self.model_dir = model_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "megatron_rl.rollout.embedded_server", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", str(self.port), "--random-seed", "0", *extra_args],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        client = EngineClient(self.url, timeout=5)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"engine server exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                if client.health():
                    return
            except EngineError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"engine server not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def engine_models(tmp_path_factory) -> dict[str, Path]:
    """Two tiny models of one family with different weights ("a" is served, "b" is for weight updates),
    and one of another family (names that do not match "a")."""
    root = tmp_path_factory.mktemp("engine-models")
    return {
        "a": write_tiny_hf_model(root / "a", ENGINE_FAMILY, seed=0),
        "b": write_tiny_hf_model(root / "b", ENGINE_FAMILY, seed=1),
        "other_family": write_tiny_hf_model(root / "llama", "llama", seed=2),
    }


@pytest.fixture(scope="module")
def engine_server(engine_models, tmp_path_factory):
    """One embedded engine serving model "a", batch bounded at 4 running requests."""
    log_path = tmp_path_factory.mktemp("engine-server") / "server.log"
    server = EngineServer(engine_models["a"], log_path, "--max-running-requests", "4")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def engine_client(engine_server) -> EngineClient:
    return EngineClient(engine_server.url, timeout=60)
