"""Seconds and GB/s to move the trainer's weights into the engine, per path, against a plain memory copy.

    .venv/bin/python benchmarks/bench_weight_sync.py [--sizes 10,50,150,500] [--repeats 3] [--bucket-mb 512]
                                                     [--out benchmarks/results/weight_sync.json]

For each size (millions of parameters, fp32) a random Llama-shaped megatron model is built in this
process (TP = PP = 1) and an embedded engine with the same config (random `--load-format dummy` weights)
is started with `megatron-rl engine serve` on 127.0.0.1. Then `--repeats` rounds of the following, one
after the other (so that other processes' load falls on all alike), the best time of each kept:

* copy: `clone()` of every parameter — one plain memory copy of the same bytes, the yardstick;
* stream: iterating `convert.iter_hf_buckets` alone (the HF-named bucket stream every path starts from);
* disk: `DiskWeightSync.write` into /dev/shm, then the engine's `update_weights_from_disk` (k1.5's path);
* tensor: `TensorWeightSync.push` (`hybrid.weight_sync=cuda_ipc`; on CPU the buckets go by shared memory);
* broadcast: `DistributedWeightSync.push` (`hybrid.weight_sync=nccl`; gloo over loopback on CPU), after
  a first push that joins the process group (printed separately).

Every path is timed end to end (session, flush, weight version and its check included), and its bytes
are checked to be the model's. Ratio = path seconds / copy seconds (target: ≤ 2). Prints a table and
writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from megatron_rl.hf_checkpoint import read_hf_config
from megatron_rl.hybrid.weight_push import DistributedWeightSync, TensorWeightSync
from megatron_rl.hybrid.weight_sync import DiskWeightSync
from megatron_rl.rollout.engine_process import EmbeddedEngineProcess
from megatron_rl.train import parallel
from megatron_rl.train.convert import iter_hf_buckets
from megatron_rl.train.model import architecture_from_hf_config, build_gpt_model

# (hidden, intermediate, layers, vocab) per size in millions of parameters (untied embeddings)
SHAPES = {10: (256, 1024, 6, 8192), 50: (512, 2048, 8, 16384), 150: (768, 3072, 11, 32000),
          500: (1280, 5120, 17, 32000)}
SHM = Path("/dev/shm")


def write_config(directory: Path, size: int) -> Path:
    """A Llama config of about `size` M parameters, and an empty placeholder safetensors file: the engine
    starts with random (dummy) weights, and a HF directory must hold one."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, intermediate, layers, vocab = SHAPES[size]
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, max_position_embeddings=512,
                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(directory)
    save_file({"placeholder": torch.zeros(1)}, str(directory / "placeholder.safetensors"))
    return directory


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure_size(size: int, repeats: int, bucket_bytes: int, work: Path) -> dict:
    model_dir = write_config(work / f"model-{size}m", size)
    arch = architecture_from_hf_config(read_hf_config(model_dir))
    with parallel.model_parallel(1, 1):
        model = build_gpt_model(arch)
        trainer = types.SimpleNamespace(model=model, arch=arch, hf_source=model_dir)
        parameters = sum(p.numel() for p in model.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"{size}M: {parameters / 1e6:.1f}M parameters, {nbytes / 1e9:.2f} GB", flush=True)

        def copy() -> float:
            with torch.no_grad():
                started = time.perf_counter()
                copies = [p.detach().clone() for p in model.parameters()]
                seconds = time.perf_counter() - started
            del copies
            return seconds

        def stream() -> float:
            return timed(lambda: [None for _ in iter_hf_buckets(model, arch, bucket_bytes)])

        engine = EmbeddedEngineProcess(model_dir, work / f"engine-{size}m.log", load_format="dummy")
        with engine:
            client = engine.start(timeout=600)
            client.timeout = 600
            counter = iter(range(1_000_000))

            def disk() -> float:
                version = f"disk-{next(counter)}"
                with DiskWeightSync(SHM, work / f"run-{size}m", bucket_bytes) as weight_sync:
                    started = time.perf_counter()
                    written = weight_sync.push(trainer, version)
                    write_seconds = time.perf_counter() - started
                    client.update_weights_from_disk(str(written.path), weight_version=version)
                    if client.weight_version() != version:
                        raise RuntimeError(f"the engine did not take {version}")
                    seconds = time.perf_counter() - started
                assert written.bytes == nbytes, (written.bytes, nbytes)
                disk.write_seconds = min(getattr(disk, "write_seconds", float("inf")), write_seconds)
                return seconds

            def push_with(sync) -> float:
                pushed = sync.push(trainer, f"{type(sync).__name__}-{next(counter)}")
                assert pushed.bytes == nbytes, (pushed.bytes, nbytes)
                return pushed.seconds

            row = {"size_m": size, "parameters": parameters, "bytes": nbytes, "bucket_bytes": bucket_bytes}
            with TensorWeightSync(client.base_url, bucket_bytes) as tensor_sync, \
                    DistributedWeightSync(client.base_url, bucket_bytes) as broadcast_sync:
                row["broadcast_first_s"] = push_with(broadcast_sync)  # joins the process group first (once per run)
                measures = {"copy": copy, "stream": stream, "disk": disk, "tensor": lambda: push_with(tensor_sync),
                            "broadcast": lambda: push_with(broadcast_sync)}
                # round-robin, so that other processes' load falls on every path alike; the best of each is kept
                for _ in range(repeats):
                    for path, measure in measures.items():
                        row[f"{path}_s"] = min(row.get(f"{path}_s", float("inf")), measure())
            row["disk_write_s"] = disk.write_seconds
    for path in ("stream", "disk", "tensor", "broadcast"):
        row[f"{path}_ratio"] = row[f"{path}_s"] / row["copy_s"]
    print(f"  copy {row['copy_s']:.3f} s, stream {row['stream_s']:.3f} s, disk {row['disk_s']:.3f} s, "
          f"tensor {row['tensor_s']:.3f} s, broadcast {row['broadcast_s']:.3f} s "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50,150,500", help=f"model sizes in M parameters, of {sorted(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timings per path and size; the best is kept")
    parser.add_argument("--bucket-mb", type=int, default=512, help="hybrid.bucket_size_mb (default 512)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weight_sync.json")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size]
    unknown = [size for size in sizes if size not in SHAPES]
    if unknown:
        parser.error(f"--sizes: no shape for {unknown}; choose from {sorted(SHAPES)}")
    print(f"{os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    try:
        rows = [measure_size(size, args.repeats, args.bucket_mb * 2**20, work) for size in sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started

    print()
    print("| parameters | GB (fp32) | copy | stream | disk (write + load) | tensor | broadcast (gloo) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        def cell(path: str) -> str:
            seconds = row[f"{path}_s"]
            return f"{seconds:.3f} s, {row['bytes'] / seconds / 1e9:.2f} GB/s, {row[f'{path}_ratio']:.1f}×"
        print(f"| {row['parameters'] / 1e6:.0f}M | {row['bytes'] / 1e9:.2f} "
              f"| {row['copy_s']:.3f} s, {row['bytes'] / row['copy_s'] / 1e9:.2f} GB/s | {cell('stream')} "
              f"| {cell('disk')} (write {row['disk_write_s']:.3f} s) | {cell('tensor')} | {cell('broadcast')} |")
    first = ", ".join(f"{row['broadcast_first_s']:.2f} s" for row in rows)
    print(f"\nfirst broadcast push (group join included): {first}; total run {total:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs {platform.machine()} {platform.platform()}",
                                    "torch": torch.__version__, "repeats": args.repeats, "total_s": total,
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
