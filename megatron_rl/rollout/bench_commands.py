"""`megatron-rl bench ...` subcommands: benchmarks that print a table and write JSON and a plot."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from megatron_rl.rollout.bench import BenchSettings

    bench = subparsers.add_parser("bench", help="benchmarks (tables on stdout, JSON and PNG files)")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    rollout = benchmarks.add_parser(
        "rollout", help="synchronous full rollouts vs partial rollouts on a long-tail workload, with the engine's "
                        "saturated throughput as the ceiling (megatron_rl/rollout/bench.py says how)")
    defaults = BenchSettings()
    rollout.add_argument("--engine-url", dest="engine_urls", action="append", default=[],
                         help="a running SGLang or `megatron-rl engine serve`; repeat it for several engines (the "
                              "rollout master spreads the requests); default: start the embedded engine")
    rollout.add_argument("--api-key", default=None, help="the engines' --api-key, if they were started with one")
    rollout.add_argument("--model", default=defaults.model,
                         help=f"model to serve (and whose tokenizer formats the prompts); default {defaults.model}")
    rollout.add_argument("--slots", type=int, default=defaults.slots,
                         help=f"max running requests of the embedded engine (default {defaults.slots})")
    rollout.add_argument("--samples-per-prompt", type=int, default=defaults.samples_per_prompt)
    rollout.add_argument("--groups-per-iteration", type=int, default=defaults.groups_per_iteration)
    rollout.add_argument("--length-median", type=int, default=defaults.length_median,
                         help="median response length in tokens (log-normal)")
    rollout.add_argument("--length-sigma", type=float, default=defaults.length_sigma,
                         help="log-normal shape: the larger, the heavier the tail")
    rollout.add_argument("--length-min", type=int, default=defaults.length_min)
    rollout.add_argument("--length-cap", type=int, default=defaults.length_cap, help="longest response, in tokens")
    rollout.add_argument("--segment-tokens", type=int, default=defaults.segment_tokens,
                         help="partial rollouts: a trajectory's token budget per iteration")
    rollout.add_argument("--max-iterations-per-trajectory", type=int, default=defaults.max_iterations_per_trajectory,
                         help="partial rollouts: the staleness bound")
    rollout.add_argument("--sync-iterations", type=int, default=defaults.sync_iterations)
    rollout.add_argument("--partial-iterations", type=int, default=defaults.partial_iterations)
    rollout.add_argument("--saturated-seconds", type=float, default=defaults.saturated_seconds,
                         help="how long the saturated measurement runs (default: as long as the partial rollouts "
                              "took, so that its trajectories grow as long as theirs)")
    rollout.add_argument("--seed", type=int, default=defaults.seed)
    rollout.add_argument("--output-dir", default=defaults.output_dir, help="where the JSON and PNG files go")
    rollout.set_defaults(handler=run_rollout_bench)


def run_rollout_bench(args: argparse.Namespace) -> int:
    from megatron_rl.errors import UserError
    from megatron_rl.rollout.bench import BenchSettings, main

    values = {name: getattr(args, name) for name in BenchSettings.__dataclass_fields__}
    values["engine_urls"] = tuple(values["engine_urls"])
    for name in ("slots", "samples_per_prompt", "groups_per_iteration", "length_median", "length_min", "length_cap",
                 "segment_tokens", "max_iterations_per_trajectory", "sync_iterations", "partial_iterations"):
        if values[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1 (got {values[name]})")
    if values["length_min"] > values["length_cap"]:
        raise UserError(f"--length-min ({values['length_min']}) must not exceed --length-cap ({values['length_cap']})")
    if values["length_sigma"] <= 0 or (values["saturated_seconds"] is not None and values["saturated_seconds"] <= 0):
        raise UserError("--length-sigma and --saturated-seconds must be > 0")
    return main(BenchSettings(**values))
