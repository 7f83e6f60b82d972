"""long2short methods on the tiny toy (paper §2.4, Fig. 7): held-out accuracy vs mean response tokens.

The toy: builtin:tiny-digits on the echo task (prompt "6 4 7", answer its last digit). A "long-CoT" model is
made by SFT on responses that restate the digits backwards 1-4 times before answering (" 7 4 6 7 4 6 = 7"), a
"short" one by SFT on direct answers (" = 7"), both from the same random initialisation. Then, each from
the long model, through the real commands (separate processes):

  merge        long2short merge of long and short, w = 0.5
  merge + rs   shortest-rejection on the merged model (n = 8), then SFT of the merged model on it
  rs           shortest-rejection on the long model (n = 8), then SFT of the long model on it
  dpo          dpo-pairs on the long model (n = 8), then DPO of the long model (β 0.1, chosen NLL weight 1)
  l2s rl       `megatron-rl train` with examples/long2short-rl.yaml (length penalty from iteration 1,
               max 12 new tokens instead of 32) from the long model

Every model answers the same held-out prompts greedily with the long model's budget (32 new tokens).
Writes JSON and a PNG (accuracy vs mean tokens) and prints a markdown table for RESULTS.md.

    python benchmarks/bench_long2short.py [--out benchmarks/results] [--work DIR] [--rl-iterations 8]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "megatron_rl" / "examples"
MAX_NEW_TOKENS = 32
SAMPLING = ["--n", "8", "--max-new-tokens", str(MAX_NEW_TOKENS), "--no-chat-template", "--seed", "0"]


def megatron_rl(*arguments, log: Path) -> None:
    command = [sys.executable, "-m", "megatron_rl.cli", *map(str, arguments)]
    started = time.monotonic()
    with log.open("a") as output:
        output.write(f"\n$ megatron-rl {' '.join(map(str, arguments))}\n")
        output.flush()
        finished = subprocess.run(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if finished.returncode != 0:
        raise SystemExit(f"megatron-rl {arguments[0]} {arguments[1]} failed (exit {finished.returncode}); see {log}")
    print(f"  {arguments[0]} {arguments[1] if arguments[1][0] != '-' else ''}: {time.monotonic() - started:.0f} s", flush=True)


def write_data(work: Path, seed: int) -> None:
    from megatron_rl.data.prompts import write_prompts
    from megatron_rl.data.sft_data import SFTRecord, write_records
    from megatron_rl.data.synthetic import generate_echo_prompts

    pool = generate_echo_prompts(256 + 64, seed)
    train, held_out = pool[:256], pool[256:]
    generator = random.Random(seed)
    # The "reasoning" restates the digits backwards, so a response cut off inside it ends on a digit that is
    # usually not the answer (restated forwards, a cut after a whole restatement would end on the answer).
    long = [SFTRecord(**record.model_dump(exclude_none=True),
                      response=" " + " ".join([record.prompt[::-1]] * generator.randint(1, 4)) + f" = {record.answer}")
            for record in train]
    short = [SFTRecord(**record.model_dump(exclude_none=True), response=f" = {record.answer}") for record in train]
    write_records(work / "long.jsonl", long)
    write_records(work / "short.jsonl", short)
    write_prompts(work / "train_prompts.jsonl", train)
    write_prompts(work / "sampling_prompts.jsonl", train[:64])  # rejection sampling and DPO pairs
    write_prompts(work / "held_out.jsonl", held_out)


def evaluate(model: Path, work: Path, log: Path) -> dict:
    result = work / f"eval-{model.name}.json"
    megatron_rl("long2short", "evaluate", "--prompts", work / "held_out.jsonl", "--model", model,
                "--max-new-tokens", MAX_NEW_TOKENS, "--no-chat-template", "--json", result, log=log)
    return json.loads(result.read_text())


def run(work: Path, rl_iterations: int, seed: int) -> dict[str, dict]:
    log = work / "commands.log"
    write_data(work, seed)
    sft = ["--config", EXAMPLES / "sft.yaml"]
    megatron_rl("sft", *sft, "--out", work / "long", f"data.train_file={work / 'long.jsonl'}", log=log)
    megatron_rl("sft", *sft, "--out", work / "short", f"data.train_file={work / 'short.jsonl'}", log=log)
    megatron_rl("long2short", "merge", "--a", work / "long", "--b", work / "short", "--weight", "0.5",
                "--out", work / "merge", log=log)
    for source in ("long", "merge"):
        megatron_rl("long2short", "shortest-rejection", "--prompts", work / "sampling_prompts.jsonl", "--model",
                    work / source, *SAMPLING, "--out", work / f"rs-{source}.jsonl", log=log)
        megatron_rl("sft", *sft, "--out", work / f"rs-{source}-model", "model.hf_path=null",
                    f"init_checkpoint={work / source}", f"data.train_file={work / f'rs-{source}.jsonl'}",
                    "data.epochs=4", "data.batch_size=16", "train.micro_batch_size=16", "train.lr=0.001", log=log)
    megatron_rl("long2short", "dpo-pairs", "--prompts", work / "sampling_prompts.jsonl", "--model", work / "long",
                *SAMPLING, "--out", work / "pairs.jsonl", log=log)
    megatron_rl("dpo", "--config", EXAMPLES / "dpo.yaml", "--out", work / "dpo", f"init_checkpoint={work / 'long'}",
                f"data.train_file={work / 'pairs.jsonl'}", log=log)
    megatron_rl("convert", "mcore-to-hf", "--mcore", work / "long", "--out", work / "long-hf", log=log)
    megatron_rl("train", "--config", EXAMPLES / "long2short-rl.yaml", "--run-dir", work / "rl",
                "--iterations", rl_iterations, f"model.hf_path={work / 'long-hf'}", "data.synthetic=null",
                f"data.prompts={work / 'train_prompts.jsonl'}", f"data.eval_prompts={work / 'held_out.jsonl'}",
                "logging.tensorboard=false", "logging.level=WARNING", log=log)
    rl_checkpoint = work / "rl" / "checkpoints" / (work / "rl" / "checkpoints" / "latest").read_text().strip()
    models = {"long (baseline)": work / "long", "short (direct-answer SFT)": work / "short", "merge": work / "merge",
              "merge + rs": work / "rs-merge-model", "shortest rejection + SFT": work / "rs-long-model",
              "DPO": work / "dpo", "long2short RL": rl_checkpoint}
    return {name: evaluate(model, work, log) for name, model in models.items()}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        axes.scatter(result["mean_response_tokens"], 100 * result["accuracy"], s=40)
        axes.annotate(name, (result["mean_response_tokens"], 100 * result["accuracy"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
    axes.set_xlabel("mean response tokens (held-out, greedy)")
    axes.set_ylabel("held-out accuracy (%)")
    axes.set_title("long2short on the tiny echo toy (cf. k1.5 Fig. 7)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def table(results: dict[str, dict]) -> str:
    lines = ["| model | held-out accuracy | mean response tokens | truncated at 32 |", "|---|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | {100 * result['accuracy']:.1f}% | {result['mean_response_tokens']:.1f} | "
                     f"{100 * result['truncated_fraction']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, help="keep the models and logs here (default: a temporary directory)")
    parser.add_argument("--rl-iterations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-long2short-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results = run(work, args.rl_iterations, args.seed)
    minutes = (time.monotonic() - started) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long2short.json").write_text(json.dumps(
        {"setup": "builtin:tiny-digits, echo task, 64 held-out prompts, greedy, 32 new tokens", "seed": args.seed,
         "rl_iterations": args.rl_iterations, "minutes": round(minutes, 1), "results": results}, indent=2) + "\n")
    plot(results, args.out / "long2short.png")
    print(f"\n{table(results)}\n\n({minutes:.1f} min; {args.out / 'long2short.json'}, {args.out / 'long2short.png'})")


if __name__ == "__main__":
    main()
