"""`megatron-rl bench rollout`: synchronous full rollouts against partial rollouts on a long-tail workload.

Real engines serve all three measurements, one after the other, in one run: the embedded engine (started
here, serving SmolLM2-135M-Instruct by default) or SGLang-compatible servers (`--engine-url`, repeated for
data-parallel rollout over several: the rollout master spreads the requests, the slots add up).

Workload. Prompts: the synthetic arithmetic problems of `make run`, chat-formatted. Each trajectory
(group g, sample s) gets its own response length, drawn from a log-normal distribution (median
`--length-median` tokens, shape `--length-sigma`) clipped to [`--length-min`, `--length-cap`] — response
lengths of reasoning models are heavy-tailed: most answers are short, a few run very long. The length is
enforced with `max_new_tokens` and `ignore_eos`, and seeded by (seed, g, s), so every mode generates
exactly the same trajectories: the same prompts (one `PromptSampler`, same seed, group g = the g-th
draw), lengths and sampling seeds (temperature 1). Repeat detection is off (it would end some samples
early in one mode only).

Measurements, in this order:
- sync: synchronous full rollouts, `--groups-per-iteration` groups of `--samples-per-prompt` per
  iteration, each run to its end; the iteration waits for its longest trajectory.
- partial: partial rollouts (rollout/partial.py) with an iteration budget of the expected output of the
  same groups (groups × samples × mean length), a per-trajectory budget of `--segment-tokens` per
  iteration and the staleness bound `--max-iterations-per-trajectory`. Requests still running when the
  budget is spent are stopped and continued in the next iteration from prompt + tokens so far: the
  engine prefills those tokens again (a weight update between iterations invalidates their KV), which
  the table reports as "resent tokens".
- saturated: every engine slot busy with the workload's requests (one is sent whenever one returns), no
  iteration boundary, for `--saturated-seconds` (default: as long as the partial rollouts took); then the
  running ones are stopped. The ceiling: what the engine delivers on this workload when nothing ever
  waits (its one cold start is included). It runs as long as the partial rollouts so that both hold the
  same share of cold start and the same range of trajectory lengths: a slot makes a few tokens per second
  on CPU, so a short window stops every trajectory while it is still short, where the partial rollouts
  continue theirs over iterations up to `--length-cap`.

Metrics: output tok/s = tokens generated / wall time (stopped requests' partial outputs included: they
are kept and continued, not lost); engine busy = share of slot time with a request running (from the
master's request timing: slots = the engine's max_running_requests); wall time per iteration, p50/p99;
tokens carried over = generated in trajectories unfinished at the end (kept in the replay buffer);
tokens wasted = generated and thrown away (failed groups). Results: a table on stdout, a JSON file and
a PNG plot (slot occupancy over time per mode, and throughput against the ceiling).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import platform
import random
import statistics
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from megatron_rl.data.arithmetic import generate_arithmetic_prompts
from megatron_rl.data.formatting import EncodedPrompt, encode_prompts, load_tokenizer
from megatron_rl.data.sampler import PromptSampler
from megatron_rl.errors import UserError
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.master import RolloutMaster
from megatron_rl.rollout.partial import PartialRollout, PartialRolloutSettings, request_seed
from megatron_rl.rollout.protocol import EngineError, GenerateRequest, SamplingParams

logger = logging.getLogger(__name__)

PROMPT_COUNT = 512


@dataclass(frozen=True)
class BenchSettings:
    model: str = "builtin:smollm2-135m-instruct"
    engine_urls: tuple[str, ...] = ()  # none: start the embedded engine
    api_key: str | None = None  # of engines started with --api-key
    slots: int = 24  # max_running_requests of the embedded engine started here
    samples_per_prompt: int = 8
    groups_per_iteration: int = 8
    length_median: int = 16
    length_sigma: float = 1.5
    length_min: int = 4
    length_cap: int = 1024
    segment_tokens: int = 256
    max_iterations_per_trajectory: int = 8
    sync_iterations: int = 3
    partial_iterations: int = 4
    saturated_seconds: float | None = None  # None: as long as the partial rollouts took
    seed: int = 0
    output_dir: str = "benchmarks/results"


@dataclass
class IterationRecord:
    iteration: int
    seconds: float
    output_tokens: int
    busy_fraction: float
    finished_groups: int
    carried_over_tokens: int = 0
    stopped_requests: int = 0
    resent_tokens: int = 0


@dataclass
class ModeResult:
    mode: str
    seconds: float
    output_tokens: int
    busy_fraction: float
    iterations: list[IterationRecord] = field(default_factory=list)
    carried_over_tokens: int = 0  # in unfinished trajectories at the end
    wasted_tokens: int = 0
    resent_tokens: int = 0
    finished_trajectories: int = 0
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s since the mode's start, running requests)

    @property
    def tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else math.nan

    def iteration_seconds(self, fraction: float) -> float:
        values = sorted(record.seconds for record in self.iterations)
        if not values:
            return math.nan
        position = fraction * (len(values) - 1)  # linear interpolation between order statistics
        low = math.floor(position)
        high = min(low + 1, len(values) - 1)
        return values[low] + (values[high] - values[low]) * (position - low)


class Workload:
    """Prompts and per-trajectory response lengths (module docstring)."""

    def __init__(self, prompts: list[EncodedPrompt], settings: BenchSettings):
        self.prompts = prompts
        self.settings = settings

    def length(self, group_id: int, sample_index: int) -> int:
        s = self.settings
        draw = random.Random(f"{s.seed}:{group_id}:{sample_index}").lognormvariate(math.log(s.length_median),
                                                                                  s.length_sigma)
        return max(s.length_min, min(s.length_cap, round(draw)))

    def mean_length(self, draws: int = 200_000) -> float:
        """The distribution's mean (Monte Carlo over trajectories the bench never runs)."""
        return statistics.fmean(self.length(-1 - index, 0) for index in range(draws))

    def sampler(self) -> PromptSampler:
        return PromptSampler(len(self.prompts), self.settings.seed)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.settings.length_cap, temperature=1.0, ignore_eos=True)


def _timeline(master: RolloutMaster, started: float) -> list[tuple[float, int]]:
    points = [(round(at - started, 3), running) for at, running in master.timeline if at >= started]
    master.timeline.clear()
    return points


def measure_saturated(master: RolloutMaster, workload: Workload, seconds: float) -> ModeResult:
    """Every slot busy for `seconds` with the workload's requests, then stop (module docstring)."""
    sampler, settings, base = workload.sampler(), workload.settings, workload.sampling()

    def requests():  # the trajectories the rollout modes start, in the same order, with the same seeds
        for group_id in itertools.count():
            prompt = workload.prompts[sampler.next_indices(1)[0]]
            for sample_index in range(settings.samples_per_prompt):
                params = base.model_copy(update={"max_new_tokens": workload.length(group_id, sample_index),
                                                 "sampling_seed": request_seed(settings.seed, group_id, sample_index)})
                yield GenerateRequest(input_ids=prompt.input_ids, sampling_params=params)

    next_requests = requests()
    started, busy_before = time.monotonic(), master.busy_slot_seconds()
    deadline = started + seconds
    in_flight: set[Future] = set()
    tokens = finished = 0
    stopping = False
    while True:
        if not stopping:
            while len(in_flight) < master.capacity:
                in_flight.add(master.submit(next(next_requests)))
        timeout = None if stopping else max(deadline - time.monotonic(), 0.0)
        done, _ = wait(in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            in_flight.remove(future)
            result = future.result().result
            tokens += len(result.output_ids)
            finished += result.finish_reason != "abort"
        if not stopping and time.monotonic() >= deadline:
            stopping = True
            master.abort(list(in_flight))
        if stopping and not in_flight:
            break
    seconds = time.monotonic() - started
    return ModeResult("saturated", seconds, tokens, master.busy_fraction(busy_before, seconds),
                      finished_trajectories=finished, timeline=_timeline(master, started))


def measure_rollouts(master: RolloutMaster, workload: Workload, mode: str, iterations: int,
                     settings: PartialRolloutSettings, weight_version: str) -> ModeResult:
    """`iterations` iterations of (partial) rollouts from a fresh start; every group starts at group id 0."""
    rollout = PartialRollout(master, workload.prompts, workload.sampler(), workload.sampling(), settings,
                             decode=lambda ids: "", seed=workload.settings.seed,
                             trajectory_token_limit=workload.length)
    started, busy_before = time.monotonic(), master.busy_slot_seconds()
    result = ModeResult(mode, 0.0, 0, 0.0)
    for iteration in range(1, iterations + 1):
        outcome = rollout.run_iteration(iteration, weight_version)
        result.iterations.append(IterationRecord(
            iteration, outcome.seconds, outcome.output_tokens, outcome.busy_fraction, len(outcome.finished_groups),
            outcome.carried_over_tokens, outcome.stopped_requests, outcome.resent_tokens))
        result.output_tokens += outcome.output_tokens
        result.wasted_tokens += outcome.wasted_tokens
        result.resent_tokens += outcome.resent_tokens
        result.finished_trajectories += sum(len(group.trajectories) for group in outcome.finished_groups)
        print(f"  {mode:8s} iteration {iteration}: {outcome.seconds:6.1f} s, {outcome.output_tokens:6d} tokens "
              f"({outcome.output_tokens / outcome.seconds:6.1f} tok/s), busy {outcome.busy_fraction:.0%}, "
              f"{len(outcome.finished_groups)} groups finished, load average {os.getloadavg()[0]:.1f}", flush=True)
    result.seconds = time.monotonic() - started
    result.busy_fraction = master.busy_fraction(busy_before, result.seconds)
    result.carried_over_tokens = rollout.buffered_tokens
    result.timeline = _timeline(master, started)
    return result


def bench_prompts(model_dir: Path) -> list[EncodedPrompt]:
    tokenizer = load_tokenizer(model_dir)
    records = generate_arithmetic_prompts(PROMPT_COUNT, seed=0)
    return encode_prompts(records, tokenizer, True, 4096, "bench prompts")


def run(settings: BenchSettings) -> dict:
    """The whole benchmark; returns what it writes to the JSON file."""
    from megatron_rl.hf_checkpoint import resolve_hf_dir
    from megatron_rl.rollout.engine_process import EmbeddedEngineProcess

    model_dir = resolve_hf_dir(settings.model)
    workload = Workload(bench_prompts(model_dir), settings)
    mean_length = workload.mean_length()
    budget = round(settings.groups_per_iteration * settings.samples_per_prompt * mean_length)
    load_before = os.getloadavg()
    prompt_lengths = [len(p.input_ids) for p in workload.prompts]
    print(f"bench rollout: model {settings.model}; prompts of {min(prompt_lengths)}-{max(prompt_lengths)} tokens; "
          f"response lengths log-normal(median {settings.length_median}, sigma {settings.length_sigma}) in "
          f"[{settings.length_min}, {settings.length_cap}], mean {mean_length:.1f}; {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as scratch:
        engine_process = None
        if not settings.engine_urls:
            engine_process = EmbeddedEngineProcess(model_dir, Path(scratch) / "engine.log", load_format="auto",
                                                   max_running_requests=settings.slots)
            clients = [engine_process.start()]
        else:
            clients = [EngineClient(url, timeout=30, api_key=settings.api_key) for url in settings.engine_urls]
            for client in clients:
                try:
                    client.get_model_info()
                except EngineError as error:
                    raise UserError(f"{error} (--engine-url); start the engine there or leave --engine-url out") from None
        clients = [client.with_timeout(3600) for client in clients]
        try:
            master = RolloutMaster(clients, record_timeline=True)
            slots, served = master.capacity, {client.base_url: client.weight_version() for client in clients}
            weight_version = served[clients[0].base_url]
            if len(set(served.values())) > 1:
                raise UserError(f"the engines serve different weight versions ({served}); benchmark engines that "
                                "serve the same weights")
            print(f"{len(clients)} engine(s) {', '.join(served)}: {slots} slots; iteration budget of partial rollouts "
                  f"{budget} tokens ({settings.groups_per_iteration} groups x {settings.samples_per_prompt} samples x "
                  f"{mean_length:.1f})", flush=True)
            # Warm-up: first-call allocations and lazy imports, outside every measurement.
            for client in clients:
                client.generate([GenerateRequest(input_ids=workload.prompts[0].input_ids,
                                                 sampling_params=SamplingParams(max_new_tokens=4))])
            sync = measure_rollouts(master, workload, "sync", settings.sync_iterations, PartialRolloutSettings(
                samples_per_prompt=settings.samples_per_prompt, groups_per_iteration=settings.groups_per_iteration,
                max_new_tokens=settings.length_cap), weight_version)
            partial = measure_rollouts(master, workload, "partial", settings.partial_iterations, PartialRolloutSettings(
                samples_per_prompt=settings.samples_per_prompt, groups_per_iteration=settings.groups_per_iteration,
                max_new_tokens=settings.length_cap, segment_token_budget=settings.segment_tokens,
                iteration_token_budget=budget, max_iterations_per_trajectory=settings.max_iterations_per_trajectory),
                weight_version)
            saturated = measure_saturated(master, workload, settings.saturated_seconds or partial.seconds)
            print(f"  saturated: {saturated.tokens_per_second:.1f} tok/s over {saturated.seconds:.1f} s, busy "
                  f"{saturated.busy_fraction:.0%}", flush=True)
            requests_per_engine = {engine.url: engine.completed for engine in master.stats()}
            master.close()
        finally:
            if engine_process is not None:
                engine_process.stop()
    modes = [saturated, sync, partial]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {**asdict(settings), "api_key": None},  # (never written out)
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "engine": {"urls": list(settings.engine_urls) or ["embedded (started by the bench)"], "slots": slots,
                   "requests_answered": requests_per_engine},
        "workload": {"prompt_tokens_min": min(prompt_lengths), "prompt_tokens_max": max(prompt_lengths),
                     "mean_response_length": mean_length, "partial_iteration_token_budget": budget},
        "modes": {mode.mode: {**{k: v for k, v in asdict(mode).items() if k not in ("timeline",)},
                              "tokens_per_second": mode.tokens_per_second,
                              "iteration_seconds_p50": mode.iteration_seconds(0.5),
                              "iteration_seconds_p99": mode.iteration_seconds(0.99)} for mode in modes},
        "partial_vs_sync": partial.tokens_per_second / sync.tokens_per_second,
        "partial_vs_saturated": partial.tokens_per_second / saturated.tokens_per_second,
        "timelines": {mode.mode: mode.timeline for mode in modes},
    }
    return report


def table(report: dict) -> str:
    saturated = report["modes"]["saturated"]["tokens_per_second"]
    lines = ["| mode | iterations | output tok/s | % of saturated | engine busy | wall s / iteration (mean) "
             "| p50 | p99 | tokens carried over | tokens wasted | resent tokens | trajectories finished |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, mode in report["modes"].items():
        iterations = mode["iterations"]
        mean = statistics.fmean(r["seconds"] for r in iterations) if iterations else math.nan

        def seconds(value: float) -> str:
            return "–" if math.isnan(value) else f"{value:.1f}"

        lines.append(f"| {name} | {len(iterations) or '–'} | {mode['tokens_per_second']:.1f} "
                     f"| {mode['tokens_per_second'] / saturated:.0%} | {mode['busy_fraction']:.0%} | {seconds(mean)} "
                     f"| {seconds(mode['iteration_seconds_p50'])} | {seconds(mode['iteration_seconds_p99'])} "
                     f"| {mode['carried_over_tokens']} | {mode['wasted_tokens']} | {mode['resent_tokens']} "
                     f"| {mode['finished_trajectories']} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slots = report["engine"]["slots"]
    figure, (occupancy, throughput) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    for name, color in (("sync", "tab:red"), ("partial", "tab:blue"), ("saturated", "tab:gray")):
        points = report["timelines"][name]
        if points:
            times, running = zip(*points)
            occupancy.step(times, running, where="post", color=color, linewidth=1.0, label=name)
            boundaries = [sum(r["seconds"] for r in report["modes"][name]["iterations"][:i + 1])
                          for i in range(len(report["modes"][name]["iterations"]) - 1)]
            for boundary in boundaries:
                occupancy.axvline(boundary, color=color, linestyle=":", linewidth=0.8)
    occupancy.axhline(slots, color="black", linewidth=0.8)
    occupancy.set(xlabel="seconds since the mode started (dotted: iteration boundaries)", ylabel="requests running",
                  title=f"engine slots in use ({slots} slots, {len(report['engine']['urls'])} engine(s))",
                  ylim=(0, slots * 1.1))
    occupancy.legend(loc="lower right")
    names = ["saturated", "sync", "partial"]
    values = [report["modes"][name]["tokens_per_second"] for name in names]
    throughput.bar(names, values, color=["tab:gray", "tab:red", "tab:blue"])
    for index, value in enumerate(values):
        throughput.text(index, value, f"{value:.0f}", ha="center", va="bottom")
    throughput.set(ylabel="output tokens / s", title="throughput")
    figure.suptitle(f"long-tail rollouts, {report['settings']['model']} ({report['date'][:10]})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(settings: BenchSettings) -> int:
    report = run(settings)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    json_path, png_path = output / "bench_rollout.json", output / "bench_rollout.png"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    plot(report, png_path)
    print()
    print(table(report))
    print()
    print(f"partial / sync: {report['partial_vs_sync']:.2f}x (target ≥ 2x); partial / saturated: "
          f"{report['partial_vs_saturated']:.0%} (target ≥ 85%); load average after "
          f"{report['machine']['load_average_after'][0]:.1f}")
    print(f"wrote {json_path} and {png_path}")
    return 0
