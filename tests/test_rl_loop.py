"""The RL loop end to end on CPU: real megatron-core trainer, real embedded engine process, real rewards."""
import json
import math
import shutil
from pathlib import Path

import pytest

from engine_fixtures import EngineServer
from megatron_rl.cli import main
from megatron_rl.hf_checkpoint import resolve_hf_dir
from megatron_rl.hybrid.weight_sync import DiskWeightSync
from megatron_rl.metrics import append_json_line
from megatron_rl.net import free_port

TINY = str(Path(__file__).resolve().parents[1] / "megatron_rl" / "examples" / "tiny.yaml")
REQUIRED_KEYS = {"iteration", "reward_mean", "accuracy", "response_len_mean", "response_len_p95",
                 "rollout_tokens_per_s", "rollout_seconds", "train_seconds", "weight_sync_seconds",
                 "iteration_seconds", "weight_version", "new_weight_version", "loss", "grad_norm", "skipped_steps",
                 "rollout_logprob_gap"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rl_learns_the_echo_task_from_chance(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", TINY, "--run-dir", str(run_dir), "--iterations", "30"]) == 0

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == list(range(1, 31))
    assert all(REQUIRED_KEYS <= set(m) for m in metrics)
    # Rollout i ran on the weights of iteration i-1, and the engine took version i afterwards.
    assert all(m["weight_version"] == str(m["iteration"] - 1) and m["new_weight_version"] == str(m["iteration"])
               for m in metrics)
    # The engine sampled with the weights the trainer holds: their log-probs agree (fp32 on both sides).
    assert all(m["rollout_logprob_gap"] < 1e-3 for m in metrics), [m["rollout_logprob_gap"] for m in metrics]
    rewards = [m["reward_mean"] for m in metrics]
    assert rewards[0] < 0.3, rewards  # chance: one token in 20 is the right digit
    assert sum(rewards[-5:]) / 5 >= 0.9, rewards
    evaluations = read_jsonl(run_dir / "eval.jsonl")
    assert [e["after_iterations"] for e in evaluations] == [0, 10, 20, 30]
    assert evaluations[0]["accuracy"] < 0.5 and evaluations[-1]["accuracy"] >= 0.9
    assert len(list((run_dir / "rollouts").glob("iteration-*.jsonl"))) == 30
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"iteration": 1}\n')
    assert main(["train", "--config", TINY, "--run-dir", str(run_dir)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == '{"iteration": 1}\n'


def test_a_malformed_prompt_line_is_named_by_file_and_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "1 2", "answer": "2"}\n{"id": "b", "prompt": "3 4", "answer": \n')
    code = main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), f"data.prompts={prompts}"])
    assert code == 2
    assert f"{prompts}:2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unreachable_engine_stops_the_run_with_a_clear_error(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), f"rollout.engine_url={url}"])
    assert code == 1
    error = capsys.readouterr().err
    assert f"cannot reach engine at {url}" in error and "rollout.engine_url" in error
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_engine_that_rejects_the_weights_stops_the_run(tmp_path, tiny_models, capsys):
    with EngineServer(tiny_models["qwen3"], tmp_path / "engine.log") as server:  # another architecture than the trainer's
        code = main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), f"rollout.engine_url={server.url}"])
    assert code == 1
    error = capsys.readouterr().err
    assert "weight sync of version 0 failed" in error and "do not match the served model" in error
    # The weights written for the engine do not outlive the failed run in shared memory.
    assert not DiskWeightSync("/dev/shm", tmp_path / "run", 1).directory.exists()


def test_requests_the_engine_rejects_drop_their_prompt_group_and_are_counted(tmp_path):
    # The engine serves the same weights with a shorter context than the trainer's: prompts of 9 tokens
    # fit the trainer but the engine answers 400 for them. Their groups are dropped, the run goes on.
    engine_model = tmp_path / "short-context"
    shutil.copytree(resolve_hf_dir("builtin:tiny-digits"), engine_model)
    config = json.loads((engine_model / "config.json").read_text())
    (engine_model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8}))
    prompts = tmp_path / "prompts.jsonl"
    for index, text in enumerate(["1 2 3", "4 5 6", "7 8 9", "1 2 3 4 5"]):
        append_json_line(prompts, {"id": f"p{index}", "prompt": text, "answer": text[-1]})
    with EngineServer(engine_model, tmp_path / "engine.log") as server:
        code = main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), "--iterations", "2",
                     f"rollout.engine_url={server.url}", f"data.prompts={prompts}", "data.prompts_per_iteration=4",
                     "rollout.samples_per_prompt=2", "train.optimizer_steps_per_iteration=1"])
    assert code == 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(m["failed_groups"], m["failed_requests"], m["samples"]) for m in metrics] == [(1, 2, 6), (1, 2, 6)]


def test_metrics_lines_are_whole_json_with_null_for_non_finite_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_json_line(path, {"iteration": 1, "loss": math.nan, "grad_norm": math.inf, "nested": [math.nan, 1.0]})
    append_json_line(path, {"iteration": 2, "loss": 0.5})
    assert read_jsonl(path) == [{"iteration": 1, "loss": None, "grad_norm": None, "nested": [None, 1.0]},
                                {"iteration": 2, "loss": 0.5}]


def test_the_restart_lifecycle_stops_the_engine_after_each_rollout_and_starts_it_with_the_new_weights(tmp_path):
    run_dir = tmp_path / "run"
    code = main(["train", "--config", TINY, "--run-dir", str(run_dir), "--iterations", "2",
                 "hybrid.engine_lifecycle=restart", "data.prompts_per_iteration=8", "train.optimizer_steps_per_iteration=2"])
    assert code == 0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    # Each rollout ran on a freshly started engine holding exactly the trainer's weights of the iteration before.
    assert [m["weight_version"] for m in metrics] == ["0", "1"]
    assert all(m["rollout_logprob_gap"] < 1e-3 and m["engine_restarts"] == 0 for m in metrics)
    starts = (run_dir / "engine.log").read_text().count("embedded engine: serving")
    assert starts == 3  # at the run's start, then after each iteration's weight sync


@pytest.mark.parametrize("weight_sync", ["cuda_ipc", "nccl"])
def test_the_in_memory_weight_paths_run_the_loop_and_pass_the_swap_guard(tmp_path, weight_sync):
    """cuda_ipc on CPU hands shared-memory buckets to the engine; nccl broadcasts over gloo. Nothing is
    written to hybrid.shm_dir, and every synced version scores the probes as the trainer does."""
    run_dir, shm_dir = tmp_path / "run", tmp_path / "shm"
    shm_dir.mkdir()
    assert main(["train", "--config", TINY, "--run-dir", str(run_dir), "--iterations", "2",
                 f"hybrid.weight_sync={weight_sync}", f"hybrid.shm_dir={shm_dir}", "data.prompts_per_iteration=8",
                 "train.optimizer_steps_per_iteration=2", "hybrid.swap_guard_threshold=1e-4"]) == 0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [(m["weight_version"], m["new_weight_version"]) for m in metrics] == [("0", "1"), ("1", "2")]
    assert all(m["swap_guard_mean_gap"] < 1e-4 and m["swap_guard_seconds"] > 0 for m in metrics)
    assert all(m["rollout_logprob_gap"] < 1e-3 and m["weight_sync_bytes"] > 0 for m in metrics)
    assert not any(shm_dir.iterdir())


@pytest.mark.parametrize("weight_sync", ["cuda_ipc", "nccl"])
def test_two_engines_share_every_rollout_and_each_gets_every_pushed_version(tmp_path, weight_sync):
    run_dir = tmp_path / "run"
    assert main(["train", "--config", TINY, "--run-dir", str(run_dir), "--iterations", "2", "rollout.engines=2",
                 f"hybrid.weight_sync={weight_sync}", "data.prompts_per_iteration=8",
                 "train.optimizer_steps_per_iteration=2", "hybrid.swap_guard_threshold=1e-4"]) == 0
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    # Each engine answered part of each rollout; the swap guard checked both after every push.
    assert all(min(m["engine_requests"]) > 0 and sum(m["engine_requests"]) == m["samples"] for m in metrics)
    assert all(m["swap_guard_mean_gap"] < 1e-4 and m["rollout_logprob_gap"] < 1e-3 for m in metrics)
    status = json.loads((run_dir / "control" / "status.json").read_text())
    assert [(engine["state"], engine["weight_version"]) for engine in status["engines"]] == [("ready", "2")] * 2


@pytest.mark.parametrize(("override", "message"), [
    ("rollout.engine_url=http://127.0.0.1:1", "rollout.engines=2 starts that many engines in this run; "
                                              "rollout.engine_url names one that runs elsewhere"),
    ("rollout.engine=sglang", "rollout.engines=2 is for the embedded engine; for data-parallel SGLang keep "
                              "rollout.engines=1 and pass --dp-size N"),
])
def test_more_engines_than_one_where_they_cannot_be_started_is_refused_by_name(tmp_path, capsys, override, message):
    assert main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), "rollout.engines=2", override]) == 2
    assert message in capsys.readouterr().err


def test_an_engine_beyond_loopback_without_a_token_for_its_api_key_is_refused_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MEGATRON_RL_SIDECAR_TOKEN", raising=False)
    assert main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), "rollout.engine_host=0.0.0.0"]) == 2
    assert ("rollout.engine_host=0.0.0.0 is not a loopback address, and there is no token for the engine's API key: "
            "set hybrid.sidecar_token_file") in capsys.readouterr().err


def test_a_push_path_with_the_restart_lifecycle_is_refused_by_name(tmp_path, capsys):
    assert main(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), "hybrid.weight_sync=nccl",
                 "hybrid.engine_lifecycle=restart"]) == 2
    assert "hybrid" in (err := capsys.readouterr().err) and "engine_lifecycle=release" in err
    assert not (tmp_path / "run").exists()
