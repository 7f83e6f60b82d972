"""One pod's layout as separate processes on this machine: etcd, the sidecar with its engine, the trainer."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_a_local_pod_trains_with_advancing_weight_versions_and_leaves_no_process_behind(tmp_path):
    run_dir = tmp_path / "pod"
    finished = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "local-pod", "--config", "megatron_rl/examples/local-pod.yaml",
         "--run-dir", str(run_dir), "--iterations", "3", "eval.interval=0"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["weight_version"], m["new_weight_version"]) for m in metrics] == [("0", "1"), ("1", "2"), ("2", "3")]
    # After every sync the engine (another process, fed by the sidecar) served exactly the trainer's weights.
    assert all(m["rollout_logprob_gap"] < 1e-3 for m in metrics)
    assert "control API at" in (run_dir / "sidecar.log").read_text()  # the trainer reached the engine through it
    assert (run_dir / "sidecar" / "engine.log").exists() and (run_dir / "etcd.log").exists()
    leftovers = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert leftovers == []  # etcd, the sidecar and its engine were all stopped


@pytest.mark.parametrize("weight_sync", ["disk", "nccl"])
def test_two_pods_roll_out_over_both_engines_which_listen_beyond_loopback_only_with_a_key(tmp_path, weight_sync):
    """The multi-node layout: pod-0's trainer drives its own sidecar and pod-1's (hybrid.peer_sidecar_urls)
    and spreads each rollout over both engines. Every version reaches pod-1's engine by broadcast (nccl), or
    (disk) its sidecar fetches the files from pod-0's: pod-1 has shared memory of its own, as another node.
    The engines and sidecars listen on every interface, so they ask for the pods' token."""
    run_dir = tmp_path / "pods"
    finished = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "local-pod", "--config", "megatron_rl/examples/local-pod.yaml",
         "--run-dir", str(run_dir), "--iterations", "2", "--pods", "2", "eval.interval=0",
         f"hybrid.weight_sync={weight_sync}", "rollout.engine_host=0.0.0.0", "hybrid.sidecar_host=0.0.0.0",
         "hybrid.advertise_host=127.0.0.1", "data.prompts_per_iteration=16"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["new_weight_version"] for m in metrics] == ["1", "2"]
    # Both engines answered part of every rollout, on the trainer's weights, and passed the swap guard.
    assert all(len(m["engine_requests"]) == 2 and min(m["engine_requests"]) > 0 for m in metrics)
    assert all(m["rollout_logprob_gap"] < 1e-3 and m["swap_guard_mean_gap"] < 1e-4 for m in metrics)
    for iteration in (1, 2):  # every sample, from either engine, came from the version pushed before it
        samples = [json.loads(line) for line in
                   (run_dir / "rollouts" / f"iteration-{iteration:06d}.jsonl").read_text().splitlines()]
        assert {version for sample in samples for version in sample["weight_versions"]} == {str(iteration - 1)}
    pod_1_log = (run_dir / "sidecar-1.log").read_text()
    assert (run_dir / "sidecar-1" / "engine.log").exists() and "pod-1" in pod_1_log
    # Disk: every version's files (the first's and the two trained) came to pod-1 from pod-0's sidecar.
    fetched = re.findall(r"fetched \d+ weight files .* into \S+/v(\d+) from 1 sidecar", pod_1_log)
    assert fetched == (["0", "1", "2"] if weight_sync == "disk" else []), pod_1_log[-3000:]
    leftovers = subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.split()
    assert leftovers == []


def test_an_engine_beyond_loopback_refuses_requests_without_its_key(tmp_path):
    from megatron_rl.builtin_models import resolve_builtin
    from megatron_rl.rollout.client import EngineClient
    from megatron_rl.rollout.engine_process import EmbeddedEngineProcess
    from megatron_rl.rollout.protocol import EngineError

    engine = EmbeddedEngineProcess(resolve_builtin("builtin:tiny-digits"), tmp_path / "engine.log", host="0.0.0.0",
                                   advertise_host="127.0.0.1", api_key="the-key")
    with engine:
        engine.start(timeout=120)
        assert EngineClient(engine.url, timeout=10).health()  # probes need no key
        try:
            EngineClient(engine.url, timeout=10).get_model_info()
        except EngineError as error:
            assert error.status == 401 and "--api-key" in str(error)
        else:
            raise AssertionError("the engine answered a request without its API key")
        assert EngineClient(engine.url, timeout=10, api_key="the-key").weight_version() == "default"
    refused = subprocess.run([sys.executable, "-m", "megatron_rl.cli", "engine", "serve", "--model", "x",
                              "--host", "0.0.0.0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "pass --api-key KEY too" in refused.stderr


def test_more_pods_than_one_with_the_one_node_weight_path_is_refused_before_anything_starts(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "local-pod", "--config", "megatron_rl/examples/local-pod.yaml",
         "--run-dir", str(tmp_path / "pods"), "--pods", "2", "hybrid.weight_sync=cuda_ipc"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert ("--pods 2: the other pods' engines stand for other nodes, which CUDA IPC handles do not reach; use "
            "hybrid.weight_sync=disk or nccl") in finished.stderr
    assert not (tmp_path / "pods").exists()  # no etcd, no sidecar, nothing written
