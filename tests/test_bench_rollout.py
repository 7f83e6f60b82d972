"""`megatron-rl bench rollout` end to end on a tiny model: the three measurements, their bookkeeping, the files,
and several engines behind one rollout master (what `--engine-url URL --engine-url URL` benchmarks)."""
from __future__ import annotations

import json

import pytest

from megatron_rl.builtin_models import resolve_builtin
from megatron_rl.cli import main
from megatron_rl.rollout.bench import BenchSettings, Workload, bench_prompts
from megatron_rl.rollout.engine_process import EmbeddedEngineProcess

SETTINGS = BenchSettings(model="builtin:tiny-digits", samples_per_prompt=2, groups_per_iteration=3, length_median=6,
                         length_sigma=1.0, length_min=2, length_cap=40, segment_tokens=8, sync_iterations=2,
                         partial_iterations=3)
SMALL = [argument for name in ("model", "samples_per_prompt", "groups_per_iteration", "length_median", "length_sigma",
                               "length_min", "length_cap", "segment_tokens", "sync_iterations", "partial_iterations")
         for argument in (f"--{name.replace('_', '-')}", str(getattr(SETTINGS, name)))]


@pytest.fixture(scope="module")
def two_engines(tmp_path_factory):
    model = resolve_builtin("builtin:tiny-digits")
    engines = [EmbeddedEngineProcess(model, tmp_path_factory.mktemp("bench") / f"engine-{index}.log",
                                     load_format="auto", max_running_requests=3) for index in range(2)]
    try:
        for engine in engines:
            engine.start(timeout=120)
        yield engines
    finally:
        for engine in engines:
            engine.stop()


@pytest.mark.parametrize("engines", [0, 2])
def test_the_bench_measures_each_mode_and_writes_its_files(tmp_path, capsys, two_engines, engines):
    urls = [argument for engine in two_engines[:engines] for argument in ("--engine-url", engine.url)]
    # Several engines: the saturated ceiling runs as long as the partial rollouts took (the default).
    duration = [] if engines else ["--saturated-seconds", "2.0"]
    assert main(["bench", "rollout", *SMALL, *duration, *urls, "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_rollout.json").read_text())
    assert (tmp_path / "bench_rollout.png").stat().st_size > 0
    assert "| partial |" in capsys.readouterr().out
    modes = report["modes"]
    # Synchronous rollouts generate exactly the workload's trajectories of their groups, each to its length.
    workload = Workload(bench_prompts(resolve_builtin(SETTINGS.model)), SETTINGS)
    assert modes["sync"]["output_tokens"] == sum(workload.length(group, sample) for group in range(2 * 3)
                                                 for sample in range(2))
    assert [r["finished_groups"] for r in modes["sync"]["iterations"]] == [3, 3]
    assert modes["sync"]["carried_over_tokens"] == modes["sync"]["resent_tokens"] == 0
    # Partial rollouts: each iteration hands over at least its groups; what is stopped is carried, never lost.
    assert all(r["finished_groups"] >= 3 for r in modes["partial"]["iterations"])
    assert modes["partial"]["wasted_tokens"] == 0
    assert modes["partial"]["finished_trajectories"] == 2 * sum(r["finished_groups"] for r in modes["partial"]["iterations"])
    assert modes["saturated"]["output_tokens"] > 0 and report["partial_vs_sync"] > 0
    assert modes["saturated"]["seconds"] >= (modes["partial"]["seconds"] if engines else 2.0)
    answered = report["engine"]["requests_answered"]
    assert len(answered) == max(engines, 1) and min(answered.values()) > 0  # every engine served
    if engines:
        assert report["engine"]["slots"] == 6 and report["engine"]["urls"] == [e.url for e in two_engines]
