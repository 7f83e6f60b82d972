"""Shared fixtures for engine tests: tiny HF models, real embedded-engine server subprocesses (one per
mode: batched, the default, and deterministic), transformers references and request helpers.

Import the fixtures into a test module: `from engine_fixtures import engine_client, engine_server, ...`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_rl.net import free_port  # noqa: F401 (re-exported for the engine tests)
from megatron_rl.rollout import EngineClient, EngineError, GenerateRequest, SamplingParams
from tiny_models import write_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]
ENGINE_FAMILY = "qwen3"


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

    def __enter__(self) -> EngineServer:
        """Ready to serve (stopped again if it never gets ready); stopped on exit."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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


def serve_engine(engine_models, tmp_path_factory, *args: str):
    """Yield a ready server for model "a" (at most 4 running requests, then `args`); stop it afterwards."""
    log_path = tmp_path_factory.mktemp("engine-server") / "server.log"
    with EngineServer(engine_models["a"], log_path, "--max-running-requests", "4", *args) as server:
        yield server


@pytest.fixture(scope="module")
def engine_server(engine_models, tmp_path_factory):
    """One embedded engine serving model "a" in the default batched mode, batch bounded at 4 running requests."""
    yield from serve_engine(engine_models, tmp_path_factory)


@pytest.fixture(scope="module")
def engine_client(engine_server) -> EngineClient:
    return EngineClient(engine_server.url, timeout=60)


@pytest.fixture(scope="module")
def deterministic_server(engine_models, tmp_path_factory):
    """The same engine in deterministic mode (--enable-deterministic-inference): bitwise batch-invariant."""
    yield from serve_engine(engine_models, tmp_path_factory, "--enable-deterministic-inference")


@pytest.fixture(scope="module")
def deterministic_client(deterministic_server) -> EngineClient:
    return EngineClient(deterministic_server.url, timeout=60)


def greedy(max_new_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def request(prompt, params, rid=None, return_logprob=True) -> GenerateRequest:
    return GenerateRequest(input_ids=list(prompt), sampling_params=params, rid=rid, return_logprob=return_logprob)


def stats(client: EngineClient) -> dict:
    return client.server_info()["internal_states"][0]


def wait_for(predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def hf(engine_models):
    """transformers' own models "a" and "b", the references for the engine's outputs."""
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            for name, path in engine_models.items() if name in ("a", "b")}


@torch.no_grad()
def reference_logprobs(model, prompt, output, temperature: float = 1.0) -> list[float]:
    """log_softmax(logits / T) at the returned tokens, from one transformers forward over prompt+output."""
    logits = model(torch.tensor([list(prompt) + list(output)])).logits[0].float()
    logprobs = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return [float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(output)]


@torch.no_grad()
def reference_greedy(model, prompt, count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]
