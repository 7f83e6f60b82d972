"""k1.5's loss against a positives-only (ReST-style) baseline on the same task and seeds (paper Fig. 10).

Runs the tiny random model on the synthetic echo task (megatron_rl/examples/tiny.yaml) with
`algo.loss=k15` and `algo.loss=rest`, for each seed, as separate `megatron-rl train` processes, and
reports the first iteration at which the mean reward over a window of iterations reaches the threshold.
Writes a JSON file and a PNG of the reward curves, and prints a markdown table for RESULTS.md.

    python benchmarks/bench_k15_vs_rest.py [--seeds 0 1 2] [--iterations 40] [--out benchmarks/results]
        [--variant NAME=key=value,key=value ...]   (default: k15=algo.loss=k15 rest=algo.loss=rest)
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "megatron_rl" / "examples" / "tiny.yaml"
DEFAULT_VARIANTS = ("k15=algo.loss=k15", "rest=algo.loss=rest")
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise SystemExit(f"--variant {text!r}: write NAME=key=value[,key=value...]")
    return name, overrides.split(",")


def run(name: str, overrides: list[str], seed: int, iterations: int, run_dir: Path) -> list[float]:
    command = [sys.executable, "-m", "megatron_rl.cli", "train", "--config", str(CONFIG), "--run-dir", str(run_dir),
               "--iterations", str(iterations), *overrides, f"rollout.seed={seed}", f"data.seed={seed}",
               "eval.interval=0", "logging.save_rollouts=false", "logging.tensorboard=false", "logging.level=WARNING"]
    finished = subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["reward_mean"] for line in lines]


def iterations_to_threshold(rewards: list[float], threshold: float, window: int) -> int | None:
    """The first iteration (1-based) ending a window whose mean reward is ≥ threshold, or None."""
    for end in range(window, len(rewards) + 1):
        if sum(rewards[end - window: end]) / window >= threshold:
            return end
    return None


def plot(curves: dict[str, dict[int, list[float]]], threshold: float, path: Path) -> None:
    """Reward per iteration, one line per variant and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for (name, per_seed), color in zip(curves.items(), COLORS):
        for index, (seed, rewards) in enumerate(sorted(per_seed.items())):
            axes.plot(range(1, len(rewards) + 1), rewards, color=color, alpha=0.8, label=name if index == 0 else None)
    axes.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    axes.set_xlabel("iteration")
    axes.set_ylabel("mean reward of the rollout")
    axes.set_title("tiny model, echo task: k1.5 loss vs the positives-only (ReST) baseline")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--window", type=int, default=3, help="iterations averaged before comparing to the threshold")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--variant", action="append", dest="variants", metavar="NAME=key=value[,key=value]",
                        help="a configuration to compare (repeatable); default: k15 and rest")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = dict(parse_variant(text) for text in (args.variants or DEFAULT_VARIANTS))

    curves: dict[str, dict[int, list[float]]] = {name: {} for name in variants}
    with tempfile.TemporaryDirectory(prefix="bench-k15-rest-") as scratch:
        for seed in args.seeds:
            for name, overrides in variants.items():
                started = time.monotonic()
                curves[name][seed] = run(name, overrides, seed, args.iterations, Path(scratch) / f"{name}-{seed}")
                reached = iterations_to_threshold(curves[name][seed], args.threshold, args.window)
                print(f"{name:10s} seed {seed}: reaches {args.threshold} at iteration {reached} "
                      f"({time.monotonic() - started:.0f} s)", flush=True)

    rows = []
    for name, per_seed in curves.items():
        reached = {seed: iterations_to_threshold(rewards, args.threshold, args.window) for seed, rewards in per_seed.items()}
        finite = [value for value in reached.values() if value is not None]
        rows.append((name, reached, statistics.median(finite) if len(finite) == len(reached) else None,
                     statistics.mean(sum(r[-5:]) / 5 for r in per_seed.values())))
    (args.out / "k15_vs_rest.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "rewards": curves}, indent=1))
    plot(curves, args.threshold, args.out / "k15_vs_rest.png")

    print(f"\n| variant | overrides | iterations to mean reward ≥ {args.threshold} ({args.window}-iteration window), "
          f"per seed {args.seeds} | median | mean reward, last 5 iterations |")
    print("|---|---|---|---|---|")
    for name, reached, median, final in rows:
        per_seed = ", ".join("not reached" if value is None else str(value) for value in reached.values())
        print(f"| {name} | {', '.join(variants[name])} | {per_seed} | {median if median is not None else 'n/a'} "
              f"| {final:.3f} |")
    print(f"\nPNG: {args.out / 'k15_vs_rest.png'}; JSON: {args.out / 'k15_vs_rest.json'}")


if __name__ == "__main__":
    main()
