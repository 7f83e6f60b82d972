"""The sidecar: real embedded-engine processes, a real etcd, the sidecar as a real subprocess; loopback only.

Most tests share one in-process sidecar (module fixture) and load a weight version of their own first,
so they do not depend on each other's order beyond the first one (which sees the engine before any load).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import etcd3
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from etcd_server import CuttableProxy, etcd_server  # noqa: F401 (fixture)
from megatron_rl.config import load_config
from megatron_rl.control.etcd_store import EtcdStore
from megatron_rl.errors import UserError
from megatron_rl.hf_checkpoint import resolve_hf_dir
from megatron_rl.hybrid import commands as sidecar_commands
from megatron_rl.hybrid.sidecar import Sidecar, sidecar_from_config
from megatron_rl.hybrid.sidecar_client import SidecarClient
from megatron_rl.hybrid.sidecar_metadata import SidecarRegistration
from megatron_rl.hybrid.sidecar_protocol import (
    SidecarFailed, SidecarRequestError, SidecarStateError, SidecarStatus, SidecarTimeout, sidecar_command_keys,
    sidecar_record_key,
)
from megatron_rl.net import free_port
from megatron_rl.rollout import EngineClient, EngineError, GenerateRequest, SamplingParams
from megatron_rl.rollout.engine_process import EmbeddedEngineProcess, SGLangEngineProcess

REPO = Path(__file__).resolve().parents[1]
PROMPT = [5, 6, 7, 8]  # tiny-digits token ids ("2345")
READY_TIMEOUT = 120.0


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return resolve_hf_dir("builtin:tiny-digits")


@pytest.fixture(scope="module")
def make_version(model_dir, tmp_path_factory):
    """`make_version(name)`: a new HF directory of tiny-digits with weights perturbed by seed `name`."""
    root = tmp_path_factory.mktemp("weights")

    def make(weight_version: str) -> Path:
        target = root / f"v{weight_version}"
        shutil.copytree(model_dir, target)
        generator = torch.Generator().manual_seed(int(weight_version))
        tensors = load_file(str(model_dir / "model.safetensors"))
        perturbed = {name: tensor + 0.2 * torch.randn(tensor.shape, generator=generator)
                     for name, tensor in tensors.items()}
        save_file(perturbed, str(target / "model.safetensors"))
        return target

    return make


def greedy(url: str, max_new_tokens: int = 24):
    """One greedy generation of PROMPT with log-probs: (output ids, log-probs, weight version)."""
    request = GenerateRequest(input_ids=PROMPT, return_logprob=True,
                              sampling_params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                                                             ignore_eos=True))
    result = EngineClient(url, timeout=120).generate([request])[0]
    return result.output_ids, result.output_logprobs, result.weight_version


def process_gone(pid: int) -> bool:
    """No such process, or a zombie (it holds no memory; its reaper may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def engine_sidecar(model_dir: Path, log_dir: Path, **kwargs) -> Sidecar:
    def make_engine(port: int) -> EmbeddedEngineProcess:
        return EmbeddedEngineProcess(model_dir, log_dir / "engine.log", port=port, max_running_requests=2)

    return Sidecar(make_engine, engine_kind="embedded", start_timeout_s=READY_TIMEOUT, **kwargs)


@pytest.fixture(scope="module")
def sidecar(model_dir, tmp_path_factory):
    with engine_sidecar(model_dir, tmp_path_factory.mktemp("sidecar"), pod_name="pod-test",
                        max_engine_restarts=3) as running:
        running.start().wait_ready(READY_TIMEOUT)
        yield running


# --------------------------------------------------------------------------------------------- in process


def test_start_then_load_weights_serves_that_version(sidecar, make_version, tmp_path):
    status = sidecar.status()
    assert (status.state, status.weight_version, status.restarts, status.released_tags) == ("ready", None, 0, [])
    assert not process_gone(status.engine_pid) and status.engine_url == sidecar.engine_url
    dummy_ids, dummy_logprobs, _ = greedy(sidecar.engine_url)

    first = make_version("1")
    status = sidecar.load_weights(str(first), "1")
    assert status.weight_version == "1"
    ids, logprobs, served_version = greedy(sidecar.engine_url)
    assert served_version == "1"
    assert logprobs != dummy_logprobs  # the perturbed weights, not the random start-up ones

    second = make_version("2")
    assert sidecar.load_weights(str(second), "2").weight_version == "2"
    assert not first.exists() and second.is_dir()  # the older kept version is deleted once a newer one loaded
    reference = greedy(sidecar.engine_url)
    assert reference[2] == "2"

    with pytest.raises(SidecarRequestError, match=r"^path: .*missing.* is not a directory"):
        sidecar.load_weights(str(tmp_path / "missing"), "3")
    wrong_names = tmp_path / "wrong-names"
    shutil.copytree(second, wrong_names)
    save_file({"model.not_a_layer.weight": torch.zeros(2, 2)}, str(wrong_names / "model.safetensors"))
    with pytest.raises(SidecarRequestError, match="load_weights .*the engine refused"):
        sidecar.load_weights(str(wrong_names), "3")
    assert sidecar.status().weight_version == "2" and second.is_dir()
    assert greedy(sidecar.engine_url) == reference


def test_engine_killed_mid_generation_is_restarted_with_the_same_weights(sidecar, make_version):
    sidecar.load_weights(str(make_version("3")), "3")
    reference_ids, reference_logprobs, _ = greedy(sidecar.engine_url)
    before = sidecar.status()

    errors: list[Exception] = []

    def long_generation():
        try:
            greedy(sidecar.engine_url, max_new_tokens=120)
        except EngineError as error:
            errors.append(error)

    generation = threading.Thread(target=long_generation)
    generation.start()
    engine = EngineClient(sidecar.engine_url, timeout=10)
    wait_for(lambda: engine.server_info()["internal_states"][0]["num_running_reqs"] > 0, 30, "generation running")
    os.kill(before.engine_pid, signal.SIGKILL)
    generation.join(60)
    assert len(errors) == 1, "the in-flight generation should fail with a connection error"

    after = sidecar.wait_ready(READY_TIMEOUT, weight_version="3")
    assert after.restarts == before.restarts + 1
    assert after.engine_pid != before.engine_pid and after.engine_url == before.engine_url
    assert "exited unexpectedly with code -9" in after.last_error
    assert EngineClient(after.engine_url).weight_version() == "3"
    ids, logprobs, served_version = greedy(after.engine_url)
    assert (ids, logprobs, served_version) == (reference_ids, reference_logprobs, "3")


def test_pushed_weights_are_recorded_and_lost_with_the_engine(sidecar, make_version):
    kept = make_version("5")
    sidecar.load_weights(str(kept), "5")
    # What a push (update_weights_from_tensor / _distributed) ends with: the engine takes the new version.
    EngineClient(sidecar.engine_url, timeout=10).update_weight_version("pushed-6")
    with pytest.raises(SidecarRequestError, match="reports weight version 'pushed-6', not 'pushed-7'"):
        sidecar.weights_pushed("pushed-7")
    assert sidecar.weights_pushed("pushed-6").weight_version == "pushed-6"
    assert not kept.exists()  # nothing on disk is the engine's version any more
    before = sidecar.status()
    os.kill(before.engine_pid, signal.SIGKILL)
    after = wait_for(lambda: (status := sidecar.status()).state == "ready" and status.restarts > before.restarts
                     and status, READY_TIMEOUT, "engine restarted")
    assert after.weight_version is None  # pushed weights cannot be re-loaded: it serves no version


def test_release_and_resume_track_the_released_tags(sidecar, make_version):
    sidecar.load_weights(str(make_version("4")), "4")
    reference = greedy(sidecar.engine_url)

    assert sidecar.release_memory(["kv_cache"]).released_tags == ["kv_cache"]
    with pytest.raises(SidecarStateError, match="tags: 'kv_cache' is already released"):
        sidecar.release_memory(["kv_cache"])
    with pytest.raises(SidecarStateError, match=r"tags: 'weights' is not released \(released_tags: kv_cache\)"):
        sidecar.resume_memory(["weights"])
    with pytest.raises(SidecarRequestError, match="tags: unknown memory tag 'gpu'"):
        sidecar.resume_memory(["gpu"])
    assert sidecar.resume_memory().released_tags == []

    assert sidecar.release_memory().released_tags == ["weights", "kv_cache", "cuda_graph"]
    with pytest.raises(EngineError) as released:
        greedy(sidecar.engine_url)
    assert released.value.status == 503
    with pytest.raises(SidecarStateError, match="weights are released"):
        sidecar.load_weights(str(make_version("5")), "5")
    assert sidecar.resume_memory(["weights"]).released_tags == ["kv_cache", "cuda_graph"]
    assert sidecar.resume_memory().released_tags == []
    assert greedy(sidecar.engine_url) == reference


def test_restart_engine_keeps_the_weight_version_and_released_memory(sidecar, make_version):
    sidecar.load_weights(str(make_version("6")), "6")
    reference = greedy(sidecar.engine_url)
    before = sidecar.release_memory(["kv_cache"])

    after = sidecar.restart_engine()
    assert (after.state, after.weight_version, after.released_tags) == ("ready", "6", ["kv_cache"])
    assert after.engine_pid != before.engine_pid and process_gone(before.engine_pid)
    assert after.restarts == before.restarts  # only crashes count
    assert EngineClient(after.engine_url).weight_version() == "6"
    with pytest.raises(EngineError):  # the new engine has its KV cache released again
        greedy(after.engine_url)
    sidecar.resume_memory()
    assert greedy(after.engine_url) == reference


def test_stopped_engine_keeps_a_loaded_version_and_starts_with_it(sidecar, make_version):
    kept = make_version("7")
    sidecar.load_weights(str(kept), "7")
    running = sidecar.status()

    stopped = sidecar.stop_engine()
    assert (stopped.state, stopped.engine_pid, stopped.weight_version) == ("stopped", None, "7")
    assert process_gone(running.engine_pid)
    with pytest.raises(SidecarTimeout, match="state stopped, .*call start_engine"):
        sidecar.wait_ready(0.5)
    with pytest.raises(SidecarStateError, match="release_memory: the engine is stopped"):
        sidecar.release_memory()

    newer = make_version("8")
    status = sidecar.load_weights(str(newer), "8")  # k1.5's lifecycle: weights arrive while the engine is down
    assert (status.state, status.weight_version) == ("stopped", "8") and not kept.exists()
    started = sidecar.start_engine()
    assert started.state == "ready" and started.weight_version == "8"
    assert sidecar.wait_ready(5, weight_version="8").engine_pid == started.engine_pid
    assert greedy(started.engine_url)[2] == "8"


def test_gives_up_after_max_engine_restarts_with_the_log_tail(model_dir, tmp_path):
    """Every start of this engine fails (its model has no config.json); a failed start counts as a crash."""
    broken_model = tmp_path / "model"
    shutil.copytree(model_dir, broken_model)
    (broken_model / "config.json").unlink()
    with engine_sidecar(broken_model, tmp_path, pod_name="pod-failing", max_engine_restarts=1) as failing:
        with pytest.raises(SidecarFailed, match="gave up after 1 restart"):
            failing.start().wait_ready(READY_TIMEOUT)
        status = failing.status()
        assert (status.state, status.restarts, status.engine_pid, status.weight_version) == ("failed", 1, None, None)
        assert "hybrid.max_engine_restarts=1" in status.last_error
        assert "config.json missing" in status.last_error  # the tail of the engine's own log
        with pytest.raises(SidecarFailed, match="release_memory: the engine has failed"):
            failing.release_memory()


def test_store_outage_keeps_the_engine_serving_and_publishing_resumes(sidecar, etcd_server):  # noqa: F811
    run_name = "outage"
    key = sidecar_record_key(run_name, sidecar.pod_name)
    proxy = CuttableProxy(etcd_server.client_port)
    proxy.cut()
    registration = SidecarRegistration(sidecar, lambda: EtcdStore([proxy.endpoint], timeout=2), run_name=run_name,
                                       lease_ttl_s=1, retry_interval_s=0.2).start()
    observer = EtcdStore([etcd_server.endpoint])
    try:
        time.sleep(1.0)  # connecting fails meanwhile
        assert observer.get(key) is None and sidecar.status().state == "ready"
        proxy.restore()
        wait_for(lambda: observer.get(key), 30, "record published once etcd is reachable")

        proxy.cut()
        wait_for(lambda: observer.get(key) is None, 30, "record gone with its lease while cut off")
        assert sidecar.release_memory(["kv_cache"]).released_tags == ["kv_cache"]  # serving goes on
        proxy.restore()
        record = wait_for(lambda: observer.get_json(key), 30, "record put again under a new lease")
        assert SidecarStatus.model_validate(record).released_tags == ["kv_cache"]
    finally:
        sidecar.resume_memory()
        registration.close()
        proxy.close()
    assert observer.get(key) is None  # closing revokes the lease
    observer.close()


# --------------------------------------------------------------------------------------------- SGLang and CLI


def test_sglang_command_and_environment(tmp_path):
    engine = SGLangEngineProcess(
        "/models/qwen", tmp_path / "engine.log", port=31234, python="/opt/python",
        sglang_args=["--tp-size", "2", "--mem-fraction-static=0.7"],
        base_env={"PATH": "/bin", "NCCL_CUMEM_ENABLE": "1",
                  "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,max_split_size_mb:128"})
    assert engine.command == [
        "/opt/python", "-m", "sglang.launch_server", "--model-path", "/models/qwen", "--host", "127.0.0.1",
        "--port", "31234", "--load-format", "dummy", "--enable-memory-saver", "--tp-size", "2",
        "--mem-fraction-static=0.7",
    ]
    assert engine.url == "http://127.0.0.1:31234"
    assert engine.env == {
        "PATH": "/bin", "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false", "NCCL_CUMEM_ENABLE": "0",
        "NCCL_GRAPH_REGISTER": "0", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128",
    }
    only_expandable = SGLangEngineProcess("/m", tmp_path / "log", port=1, base_env={
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert "PYTORCH_CUDA_ALLOC_CONF" not in only_expandable.env
    for managed in (["--port=30001"], ["--load-format", "auto"], ["--host", "0.0.0.0"]):
        with pytest.raises(UserError, match=f"rollout.sglang_args: {managed[0].split('=')[0]} is set by the sidecar"):
            SGLangEngineProcess("/m", tmp_path / "log", sglang_args=managed)

    config = load_config(None, ["model.hf_path=builtin:tiny-digits", "rollout.engine=sglang",
                                "rollout.sglang_args=[--model-path, /elsewhere]"])
    with pytest.raises(UserError, match="rollout.sglang_args: --model-path"):
        sidecar_from_config(config, tmp_path)


def test_cli_arguments_and_token_policy(tmp_path, monkeypatch):
    import argparse

    from megatron_rl.hybrid.sidecar_server import serve

    parser = argparse.ArgumentParser()
    sidecar_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["sidecar", "--config", "run.yaml", "--engine-port", "30000", "hybrid.pod_name=pod-3"])
    assert (args.config, args.engine_port, args.overrides) == ("run.yaml", 30000, ["hybrid.pod_name=pod-3"])
    assert args.handler is sidecar_commands.run_sidecar

    monkeypatch.delenv("MEGATRON_RL_SIDECAR_TOKEN", raising=False)
    exposed = load_config(None, ["model.hf_path=builtin:tiny-digits", "hybrid.sidecar_host=0.0.0.0"])
    with pytest.raises(UserError, match="hybrid.sidecar_host=0.0.0.0 is not a loopback address.*sidecar_token_file"):
        serve(exposed, log_dir=tmp_path)
    (tmp_path / "empty-token").write_text("\n")
    empty = load_config(None, [f"hybrid.sidecar_token_file={tmp_path / 'empty-token'}"])
    with pytest.raises(UserError, match="hybrid.sidecar_token_file=.* is empty"):
        serve(empty, log_dir=tmp_path)


# --------------------------------------------------------------------------------------------- subprocess + etcd


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_sidecar_process_with_etcd(etcd_server, make_version, tmp_path):  # noqa: F811
    token = "s3cret-token"
    (tmp_path / "token").write_text(token + "\n")
    port, run_name, pod_name, ttl = free_port(), "sidecar-process", "pod-a", 2
    config = {
        "model": {"hf_path": "builtin:tiny-digits"},
        "rollout": {"engine": "embedded", "engine_max_running_requests": 2},
        "hybrid": {"pod_name": pod_name, "sidecar_port": port, "sidecar_token_file": str(tmp_path / "token"),
                   "sidecar_lease_ttl_s": ttl},
        "control": {"store": "etcd", "etcd_endpoints": [etcd_server.endpoint], "run_name": run_name},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("MEGATRON_RL_SIDECAR_TOKEN", None)
    log = open(tmp_path / "sidecar.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "megatron_rl.hybrid.sidecar_server", "--config",
                                str(tmp_path / "run.yaml"), "--log-dir", str(tmp_path / "logs")],
                               cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    store = EtcdStore([etcd_server.endpoint])
    key = sidecar_record_key(run_name, pod_name)
    every_pod, this_pod = sidecar_command_keys(run_name, pod_name)
    engine_pid = None
    try:
        client = SidecarClient(url, token=token, poll_interval=0.1)
        try:
            ready = client.wait_ready(READY_TIMEOUT)
        except SidecarTimeout:
            raise AssertionError((tmp_path / "sidecar.log").read_text()) from None
        engine_pid = ready.engine_pid

        # Its record, with a lease.
        # (published asynchronously: the record may still say starting for a moment after wait_ready)
        record = wait_for(lambda: (document := store.get_json(key)) and document["state"] == "ready" and document,
                          10, "sidecar record, ready")
        assert SidecarStatus.model_validate(record).engine_pid == engine_pid
        etcd = etcd3.client(host="127.0.0.1", port=etcd_server.client_port)
        assert etcd.get(key)[1].lease_id != 0
        etcd.close()

        # Authentication and request validation.
        assert http("GET", url + "/v1/health") == (200, {"state": "ready"})
        for given in (None, "wrong-token"):
            code, body = http("GET", url + "/v1/status", token=given)
            assert code == 401 and body["error"]["type"] == "SidecarAuthError"
            assert "bearer token" in body["error"]["message"]
        code, body = http("POST", url + "/v1/weights", {"weight_version": "1"}, token=token)
        assert code == 400 and body["error"]["message"].startswith("path: Field required")
        code, body = http("POST", url + "/v1/memory/release", {"tags": ["weights", "vram"]}, token=token)
        assert code == 400 and body["error"]["message"].startswith("tags[1]:")
        code, body = http("POST", url + "/v1/weights", {"path": str(tmp_path), "weight_version": 1}, token=token)
        assert code == 400 and body["error"]["message"].startswith("weight_version:")

        # The client: same operations and errors as in process.
        assert client.load_weights(str(make_version("11")), "11").weight_version == "11"
        assert greedy(ready.engine_url)[2] == "11"
        with pytest.raises(SidecarStateError, match="'weights' is not released"):
            client.resume_memory(["weights"])
        assert client.wait_ready(5, weight_version="11").state == "ready"
        EngineClient(ready.engine_url).update_weight_version("pushed-12")
        assert client.weights_pushed("pushed-12").weight_version == "pushed-12"
        with pytest.raises(SidecarRequestError, match="not 'pushed-13'"):
            client.weights_pushed("pushed-13")

        # Operator commands, for this pod and for every pod, acknowledged in the record.
        def acknowledged(command_id: str) -> SidecarStatus | None:
            document = store.get_json(key)
            status = SidecarStatus.model_validate(document) if document else None
            return status if status and status.last_command and status.last_command.id == command_id else None

        store.put_json(this_pod, {"id": "c1", "op": "release_memory", "tags": ["kv_cache"]})
        status = wait_for(lambda: acknowledged("c1"), 30, "command c1 acknowledged")
        assert status.last_command.ok and status.released_tags == ["kv_cache"]
        assert client.status().released_tags == ["kv_cache"]
        store.put_json(every_pod, {"id": "c2", "op": "resume_memory"})
        status = wait_for(lambda: acknowledged("c2"), 30, "command c2 acknowledged")
        assert status.last_command.ok and status.released_tags == []
        store.put_json(this_pod, {"id": "c3", "op": "explode"})
        status = wait_for(lambda: acknowledged("c3"), 30, "invalid command c3 acknowledged")
        assert not status.last_command.ok and "op:" in status.last_command.message

        # kill -9: no orphan engine, and the record vanishes with the lease.
        process.kill()
        process.wait(10)
        wait_for(lambda: process_gone(engine_pid), 10, "engine gone after its sidecar was killed")
        wait_for(lambda: store.get(key) is None, ttl + 10, "record gone after the lease TTL")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if engine_pid is not None and not process_gone(engine_pid):
            os.kill(engine_pid, signal.SIGKILL)  # an orphan the test found; not left behind
        log.close()
        store.delete_prefix(f"/megatron-rl/runs/{run_name}/")
        store.close()
