"""Faults of the hybrid deployment, each against real processes: the RL loop (megatron trainer, driver),
its sidecar and engine, and a real etcd. A watcher thread follows the run's phase record in etcd and
strikes at a chosen moment."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from etcd_server import etcd_server  # noqa: F401 (a pytest fixture)
from megatron_rl.cli import main
from megatron_rl.control import StoreError, run_prefix
from megatron_rl.control.etcd_store import EtcdStore
from megatron_rl.hybrid.phases import PhaseRecord
from megatron_rl.hybrid.weight_sync import RegisteredWeights, weights_prefix
from megatron_rl.hybrid.sidecar_client import SidecarClient
from megatron_rl.net import free_port
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "megatron_rl" / "examples" / "tiny.yaml")
PROMPTS, SAMPLES = 8, 4
# Long enough responses, and a small engine batch, so a rollout lasts seconds: time to strike in it.
SMALL_RUN = ["--iterations", "3", "rollout.max_new_tokens=24", "rollout.engine_max_running_requests=4",
             f"data.prompts_per_iteration={PROMPTS}", f"rollout.samples_per_prompt={SAMPLES}",
             "train.optimizer_steps_per_iteration=2", "eval.max_prompts=4", "logging.tensorboard=false"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def etcd_run(endpoint: str) -> tuple[str, list[str]]:
    run_name = f"faults-{uuid.uuid4().hex[:8]}"
    return run_name, ["control.store=etcd", f"control.etcd_endpoints=[{endpoint}]", f"control.run_name={run_name}"]


class Striker:
    """Polls the run's phase and sidecar records; once `ready(phase, sidecar)` holds, calls `strike(sidecar)`."""

    def __init__(self, endpoint: str, run_name: str, ready, strike, timeout: float = 240.0, pod_name: str = "pod-0"):
        self.store = EtcdStore([endpoint], timeout=5.0)
        self.prefix = run_prefix(run_name)
        self.pod_name = pod_name
        self.ready, self.strike, self.timeout = ready, strike, timeout
        self.struck_at: dict | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                phase = self.store.get_json(self.prefix + "phase")
                sidecar = self.store.get_json(self.prefix + f"sidecars/{self.pod_name}")
            except StoreError:  # closed by the test while still watching: the run ended without a strike
                return
            if phase and self.ready(phase, sidecar):
                self.strike(sidecar)
                self.struck_at = phase
                return
            time.sleep(0.05)

    def close(self) -> None:
        self.thread.join(10)
        self.store.close()


def rolling_out(iteration: int):
    """Ready once the engine is generating in the rollout of `iteration`."""

    def ready(phase: dict, sidecar: dict | None) -> bool:
        if phase["phase"] != "rollout" or phase["iteration"] != iteration or not sidecar or not sidecar.get("engine_pid"):
            return False
        try:
            stats = EngineClient(sidecar["engine_url"], timeout=2).server_info()["internal_states"][0]
        except EngineError:
            return False
        return stats["num_running_reqs"] > 0

    return ready


@pytest.mark.parametrize(("engines", "weight_sync"), [(1, "disk"), (1, "cuda_ipc"), (2, "disk"), (2, "cuda_ipc")])
def test_an_engine_killed_mid_rollout_is_restarted_and_no_sample_is_lost_or_doubled(tmp_path, etcd_server,  # noqa: F811
                                                                                    engines, weight_sync):
    """One engine: the run waits for its restart; with disk it re-loads the version, with cuda_ipc it lost the
    pushed version, so the rollout is interrupted, the trainer pushes the version again and the rollout goes
    on. Two: the killed one's requests finish on the other; with disk it is back at once, with cuda_ipc it
    sits out the rest of the rollout, back with the next push."""
    run_name, store_overrides = etcd_run(etcd_server.endpoint)
    registered = {}

    def strike(sidecar: dict) -> None:
        registered.update(striker.store.get_prefix(weights_prefix(run_name)))  # what the sidecars load
        os.kill(sidecar["engine_pid"], signal.SIGKILL)

    # The run's last engine dies while it generates in rollout 2 (the second registers as pod-0-1).
    striker = Striker(etcd_server.endpoint, run_name, rolling_out(2), strike,
                      pod_name="pod-0" if engines == 1 else "pod-0-1")
    try:
        code = main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), *SMALL_RUN,
                     f"rollout.engines={engines}", f"hybrid.weight_sync={weight_sync}", *store_overrides])
        transitions = striker.store.get_prefix(run_prefix(run_name) + "transitions/00000002/")
    finally:
        striker.close()
    assert striker.struck_at is not None, "the engine was never seen generating in rollout 2"
    assert code == 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["engine_restarts"] for m in metrics] == [0, 1, 1]
    # Every sample of the interrupted rollout exactly once, and none dropped.
    rollout = read_jsonl(tmp_path / "run" / "rollouts" / "iteration-000002.jsonl")
    # (Group ids count on across iterations: rollout 2's groups follow rollout 1's.)
    assert sorted((r["group_id"], r["sample_index"]) for r in rollout) == [
        (group, sample) for group in range(PROMPTS, 2 * PROMPTS) for sample in range(SAMPLES)]
    assert (metrics[1]["samples"], metrics[1]["failed_groups"]) == (PROMPTS * SAMPLES, 0)
    # Every sample came from the trainer's weights (version 1): their log-probs agree.
    assert {version for r in rollout for version in r["weight_versions"]} == {"1"}
    assert all(m["rollout_logprob_gap"] < 1e-3 for m in metrics)
    if weight_sync == "disk":  # version 1's files were on record, as written into this node's shared memory
        (record,) = [RegisteredWeights.model_validate_json(value) for value in registered.values()]
        (copy,) = record.directories
        assert record.weight_version == "1" and copy.host == socket.gethostname() and copy.path.endswith("/v1")
        # (the shards hold the tensors plus their safetensors headers)
        shards = sum(size for name, size in copy.files.items() if name.endswith(".safetensors"))
        assert shards >= record.total_bytes == metrics[0]["weight_sync_bytes"] > 0
    else:
        assert registered == {}
    phases = [key.rsplit("-", 1)[-1] for key in sorted(transitions)]
    if (engines, weight_sync) == (1, "cuda_ipc"):  # version 1 pushed again in the middle of rollout 2
        assert phases[:3] == ["rollout", "sync", "rollout"]
        assert metrics[1]["swap_guard_mean_gap"] < 1e-4
    else:
        assert phases[:2] == ["rollout", "release"]
    if engines == 2:  # both served rollout 1, and rollout 3 again (the restarted one is back in use)
        assert min(metrics[0]["engine_requests"]) > 0 and min(metrics[2]["engine_requests"]) > 0


def test_a_killed_sidecar_is_seen_dead_through_its_lease_and_stops_the_run_clearly(tmp_path, etcd_server, capsys):  # noqa: F811
    run_name, store_overrides = etcd_run(etcd_server.endpoint)
    port = free_port()
    token = uuid.uuid4().hex
    environment = {**os.environ, "MEGATRON_RL_SIDECAR_TOKEN": token}
    sidecar_overrides = [*store_overrides, f"hybrid.sidecar_port={port}", "hybrid.sidecar_lease_ttl_s=2",
                         "rollout.max_new_tokens=24", "rollout.engine_max_running_requests=4"]
    sidecar = subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "sidecar", "--config", TINY,
                                "--log-dir", str(tmp_path / "sidecar"), *sidecar_overrides],
                               env=environment, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Ready before the trainer starts: the trainer's short engine timeout below is for the recovery wait only.
    SidecarClient(f"http://127.0.0.1:{port}", token).wait_ready(180)
    striker = Striker(etcd_server.endpoint, run_name, rolling_out(2), lambda _: sidecar.send_signal(signal.SIGKILL))
    os.environ["MEGATRON_RL_SIDECAR_TOKEN"] = token
    try:
        code = main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), *SMALL_RUN, *store_overrides,
                     f"hybrid.sidecar_url=http://127.0.0.1:{port}", "rollout.engine_start_timeout_s=8"])
    finally:
        del os.environ["MEGATRON_RL_SIDECAR_TOKEN"]
        striker.close()
        sidecar.kill()
        sidecar.wait()
    assert striker.struck_at is not None, "the engine was never seen generating in rollout 2"
    assert code == 1
    error = capsys.readouterr().err
    assert "is gone: the sidecar's lease expired" in error and f"{run_prefix(run_name)}sidecars/pod-0" in error
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 1  # iteration 1, whole; nothing after


def test_etcd_going_down_stops_the_run_with_a_clear_error_and_corrupts_nothing(tmp_path, etcd_server, capsys):  # noqa: F811
    run_name, store_overrides = etcd_run(etcd_server.endpoint)
    striker = Striker(etcd_server.endpoint, run_name, lambda phase, _: (phase["phase"], phase["iteration"]) == ("train", 2),
                      lambda _: etcd_server.stop())
    try:
        code = main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), *SMALL_RUN, *store_overrides])
    finally:
        striker.close()
        etcd_server.start()
    assert striker.struck_at is not None
    assert code == 2
    assert f"is etcd running at {etcd_server.endpoint}" in capsys.readouterr().err
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")  # every line whole
    assert [m["iteration"] for m in metrics] == [1]
    # The run's record is whole, and one the driver published at or after the moment etcd went (it may
    # have moved on from train before etcd had stopped): nothing half-written, nothing from before.
    store = EtcdStore([etcd_server.endpoint], timeout=10.0)
    try:
        record = PhaseRecord.model_validate_json(store.get(run_prefix(run_name) + "phase"))
    finally:
        store.close()
    assert (record.iteration, record.weight_version) == (2, "1") and record.phase in ("train", "offload")
