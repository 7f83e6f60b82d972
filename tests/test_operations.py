"""Operating runs: pause and resume exactly, crash recovery, run status, errors that overwrite nothing.

Deterministic settings: the engine's batch-invariant mode and seeded sampling, so a run's samples,
rewards and weights are a function of its seeds alone, however it was interrupted.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from etcd_server import etcd_server  # noqa: F401 (a pytest fixture)
from megatron_rl.cli import main
from megatron_rl.control import run_prefix
from megatron_rl.control.etcd_store import EtcdStore
from megatron_rl.control.operations import RunControl, RunOperation, RunStatus, control_for_run_dir
from megatron_rl.hf_checkpoint import WrittenDirectory
from megatron_rl.hybrid.weight_sync import SyncedWeights, register_weights
from megatron_rl.rollout.replay_buffer import decode_state
from megatron_rl.train.checkpoint import RunCheckpoints, read_run_file

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "megatron_rl" / "examples" / "tiny.yaml")
ITERATIONS = 5
DETERMINISTIC_RUN = [
    "--iterations", str(ITERATIONS), "rollout.deterministic_inference=true", "data.prompts_per_iteration=8",
    "rollout.samples_per_prompt=4", "train.optimizer_steps_per_iteration=2", "eval.max_prompts=4", "eval.interval=0",
    "logging.tensorboard=false",
]
# What differs between two runs of the same seeds: wall-clock measurements.
TIMING = ("_seconds", "_per_s", "device_free", "busy_fraction")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timings(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if not any(mark in key for mark in TIMING)}
            for record in records]


def train_process(run_dir: Path, *arguments: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "megatron_rl.cli", "train", "--run-dir", str(run_dir), *arguments],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def exported_weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


def assert_same_run(run_dir: Path, straight_dir: Path, tmp_path: Path) -> None:
    metrics, expected = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(straight_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == list(range(1, ITERATIONS + 1))  # each iteration once
    assert without_timings(metrics) == without_timings(expected)
    for iteration in range(1, ITERATIONS + 1):  # every trajectory once
        name = f"iteration-{iteration:06d}.jsonl"
        assert read_jsonl(run_dir / "rollouts" / name) == read_jsonl(straight_dir / "rollouts" / name)
    weights = exported_weights(run_dir, tmp_path / f"{run_dir.name}-hf")
    reference = exported_weights(straight_dir, tmp_path / f"{straight_dir.name}-hf")
    assert weights.keys() == reference.keys()
    assert all(torch.equal(weights[name], reference[name]) for name in weights)  # bitwise


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    finish(train_process(run_dir, "--config", TINY, *DETERMINISTIC_RUN))
    return run_dir


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def test_pause_then_resume_gives_bitwise_the_weights_and_metrics_of_a_straight_run(straight_run, tmp_path, capsys):
    run_dir = tmp_path / "paused"
    process = train_process(run_dir, "--config", TINY, *DETERMINISTIC_RUN)
    control = RunControl(run_dir, "megatron-rl")
    wait_for(lambda: (status := control.status()) is not None and status.iteration >= 1)
    assert main(["runs", "pause", str(run_dir)]) == 0  # the operator's command, against the live run
    output = finish(process)
    status = control.status()
    assert status.state == "paused" and 1 <= status.iteration < ITERATIONS, output[-2000:]
    assert f"runs resume {run_dir}" in status.message and control.pending_operation() is None
    assert Path(status.last_checkpoint).name == f"iteration-{status.iteration:06d}"

    assert main(["runs", "status", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    assert "state      paused" in shown and f"iteration  {status.iteration}" in shown

    finish(train_process(run_dir, "--resume"))  # what `runs resume` execs
    assert control.status().state == "done"
    assert_same_run(run_dir, straight_run, tmp_path)


def test_a_trainer_killed_anywhere_resumes_from_its_last_checkpoint_exactly(straight_run, tmp_path, etcd_server):  # noqa: F811
    run_name = f"crash-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "crashing"
    crash_settings = [*DETERMINISTIC_RUN, "train.save_interval=1", "control.store=etcd",
                      f"control.etcd_endpoints=[{etcd_server.endpoint}]", f"control.run_name={run_name}",
                      "control.driver_lease_ttl_s=2", "hybrid.sidecar_lease_ttl_s=2"]
    store = EtcdStore([etcd_server.endpoint], timeout=5.0)

    def phase() -> tuple[str, int] | None:
        record = store.get_json(run_prefix(run_name) + "phase")
        return (record["phase"], record["iteration"]) if record else None

    # Killed while generating, while training, and while writing a checkpoint; each time restarted with
    # --auto-resume, as Kubernetes would restart the pod.
    arguments = ["--config", TINY, *crash_settings]
    half_written = run_dir / "checkpoints" / "iteration-000004.tmp"
    for strike in [("rollout", 2), ("train", 3), ("checkpoint", 4)]:
        process = train_process(run_dir, "--auto-resume", *arguments)
        # (In the checkpoint phase, once its write has begun: the phase is entered just before.)
        wait_for(lambda: phase() == strike and (strike[0] != "checkpoint" or half_written.exists()), interval=0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        arguments = crash_settings
    assert half_written.exists()  # the write the kill interrupted
    finish(train_process(run_dir, "--auto-resume", *arguments))
    store.close()
    assert_same_run(run_dir, straight_run, tmp_path)
    # What the crashed attempts had written past their checkpoint (the rollouts of the iterations killed in
    # training and in the checkpoint write) was set aside when they resumed, not lost, not counted twice.
    aside = sorted(path.relative_to(run_dir / "rollouts").as_posix() for path in (run_dir / "rollouts").glob("after-*/*"))
    assert [name.split("/")[0].rsplit("-", 2)[0] + "/" + name.split("/")[1] for name in aside] == [
        "after-2/iteration-000003.jsonl", "after-3/iteration-000004.jsonl"]


def test_operating_a_run_that_cannot_be_operated_is_a_clear_error_and_overwrites_nothing(straight_run, tmp_path, capsys):
    # pause (or stop) a run that is not running
    before = (straight_run / "metrics.jsonl").read_bytes()
    assert main(["runs", "pause", str(straight_run)]) == 2
    assert "is not running (it is done); nothing to pause" in capsys.readouterr().err
    assert control_for_run_dir(straight_run).pending_operation() is None
    assert main(["runs", "resume", str(straight_run)]) == 2
    assert "finished all its iterations" in capsys.readouterr().err

    # a paused run whose checkpoints are gone, then one whose checkpoint is corrupt
    run_dir = tmp_path / "broken"
    RunControl(run_dir, "megatron-rl").request(RunOperation(op="pause"))  # waiting when the run starts
    finish(train_process(run_dir, "--config", TINY, *DETERMINISTIC_RUN))
    checkpoint = Path(control_for_run_dir(run_dir).status().last_checkpoint)
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    state = checkpoint / "run" / "driver.json"
    state.write_bytes(state.read_bytes().replace(b'"iteration":1', b'"iteration":7'))  # same size, other content
    assert main(["runs", "resume", str(run_dir)]) == 2
    assert f"checkpoint {checkpoint} is corrupt: its checksum does not match its files" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run_dir), "--resume"]) == 2
    assert "is corrupt" in capsys.readouterr().err
    (checkpoint.parent / "latest").unlink()
    assert main(["runs", "resume", str(run_dir)]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics and (straight_run / "metrics.jsonl").read_bytes() == before
    # a new run into an existing run's directory
    assert main(["train", "--config", TINY, "--run-dir", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err and (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_pause_now_interrupts_the_rollout_and_the_resumed_run_continues_its_partial_trajectories(tmp_path):
    run_dir = tmp_path / "paused-now"
    # Partial rollouts with responses of up to 100 tokens, 16 per iteration per trajectory: a rollout runs for
    # seconds (the iteration's 6000-token budget), and unfinished trajectories span iterations.
    arguments = ["--config", TINY, "--iterations", "3", "rollout.max_new_tokens=100", "rollout.temperature=1.5",
                 "rollout.partial.segment_token_budget=16", "rollout.partial.iteration_token_budget=6000",
                 "data.prompts_per_iteration=4", "rollout.samples_per_prompt=4", "eval.max_prompts=4",
                 "eval.interval=0", "logging.tensorboard=false"]
    process = train_process(run_dir, *arguments)
    control = RunControl(run_dir, "megatron-rl")
    # Iteration 1 is reported after its weight sync; iteration 2's rollout starts next and runs for seconds.
    wait_for(lambda: (status := control.status()) is not None and status.iteration >= 1)
    assert main(["runs", "pause", str(run_dir), "--now"]) == 0
    output = finish(process)
    assert "rollout 2 interrupted by pause --now" in output, output[-3000:]
    status = control.status()
    assert status.state == "paused" and status.iteration == 1 and control.pending_operation() is None
    checkpoint = RunCheckpoints(run_dir).latest()
    assert checkpoint.name == "iteration-000001"
    kept = decode_state(read_run_file(checkpoint, "replay_buffer.jsonl"), "kept")
    interrupted = [t for group in kept.groups for t in group.trajectories
                   if any(segment.iteration == 2 for segment in t.segments)]
    assert interrupted and all(s.weight_version == "1" for t in interrupted for s in t.segments if s.iteration == 2)
    assert [m["iteration"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1]

    finish(train_process(run_dir, "--resume"))
    assert control.status().state == "done"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert metrics[1]["continued_trajectories"] >= sum(not t.finish_reason for g in kept.groups for t in g.trajectories)
    assert all(m["swap_guard_mean_gap"] < 1e-4 for m in metrics)
    # Every trajectory trained once: no (group, sample) in two iterations' rollouts.
    trained = [(r["group_id"], r["sample_index"]) for path in sorted((run_dir / "rollouts").glob("iteration-*.jsonl"))
               for r in read_jsonl(path)]
    assert len(trained) == len(set(trained))
    # The kept groups were trained after the resume, or still wait in the final buffer.
    waiting = {g.group_id for g in decode_state(read_run_file(RunCheckpoints(run_dir).latest(), "replay_buffer.jsonl"),
                                                "final").groups}
    assert {g.group_id for g in kept.groups} <= {group for group, _ in trained} | waiting


def test_runs_status_shows_each_nodes_copy_of_the_weight_version_on_record(etcd_server, capsys):  # noqa: F811
    """With two nodes each training one pipeline stage, each node's shared memory holds its own part."""
    run_name = f"status-{uuid.uuid4().hex[:8]}"
    store = EtcdStore([etcd_server.endpoint], timeout=5.0)
    try:
        RunControl(Path("."), run_name, store).publish(RunStatus(run_name=run_name, run_dir="/runs/two-nodes",
                                                                 state="running", driver="node-0:7", iteration=3))
        copies = [WrittenDirectory("node-0", "/dev/shm/w/v3", {"model-stage000-00000.safetensors": 600_000,
                                                               "config.json": 700}),
                  WrittenDirectory("node-1", "/dev/shm/w/v3", {"model-stage001-00000.safetensors": 400_000,
                                                               "config.json": 700})]
        register_weights(store, run_name, SyncedWeights("3", Path("/dev/shm/w/v3"), 1_000_000, 0.5,
                                                        directories=copies, shm_name="w/v3"))
        assert main(["runs", "status", run_name, "--etcd", etcd_server.endpoint]) == 0
    finally:
        store.close()
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("weights")]
    assert shown == ["weights    version 3 on node-0 at /dev/shm/w/v3: 2 files, 0.6 MB",
                     "weights    version 3 on node-1 at /dev/shm/w/v3: 2 files, 0.4 MB"]
