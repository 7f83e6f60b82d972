"""One pod's layout as separate processes on this machine: etcd, the sidecar with its engine, the trainer."""
import json
import subprocess
import sys
from pathlib import Path

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
