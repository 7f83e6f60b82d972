"""Seconds and GB/s to move the trainer's weights into the engine, per path, against a plain memory copy.

    .venv/bin/python benchmarks/bench_weight_sync.py [--sizes 10,50,150,500] [--repeats 3] [--bucket-mb 512]
                                                     [--phase-iterations 3] [--phase-weight-sync disk]
                                                     [--out benchmarks/results/weight_sync.json]

For each size (millions of parameters, fp32) a random Llama-shaped megatron model is built in this
process (TP = PP = 1) and an embedded engine with the same config (random `--load-format dummy` weights)
is started with `megatron-rl engine serve` on 127.0.0.1. Then `--repeats` rounds of the following, one
after the other (so that other processes' load falls on all alike), the best time of each kept:

* copy: `clone()` of every parameter — one plain memory copy of the same bytes, the yardstick;
* stream: iterating `convert.iter_hf_buckets` alone (the HF-named bucket stream every path starts from);
* disk: `DiskWeightSync.write` into /dev/shm, then the engine's `update_weights_from_disk` (k1.5's path);
* fetch: what a node without trainer ranks adds on the disk path (`weight_delivery.fetch_weight_files`): the
  version's files fetched from a sidecar's file server (`/v1/weight-files`, in another process) over
  loopback HTTP into another directory of /dev/shm; on a cluster the network sets this figure instead;
* tensor: `TensorWeightSync.push` (`hybrid.weight_sync=cuda_ipc`; on CPU the buckets go by shared memory);
* broadcast: `DistributedWeightSync.push` (`hybrid.weight_sync=nccl`; gloo over loopback on CPU), after
  a first push that joins the process group (printed separately).

Every path is timed end to end (session, flush, weight version and its check included), and its bytes
are checked to be the model's. Ratio = path seconds / copy seconds (target: ≤ 2).

Phase switches: then, per size, a real `megatron-rl train` run (the tiny echo task, `--phase-iterations`
iterations, a few short rollouts) on a random model of that shape saved as a HF directory, with the
weight-sync path of `--phase-weight-sync`. Its metrics give each phase's seconds; the medians over the
iterations after the first are reported:

* rollout → train = release (the engine frees weights and KV cache) + onload (the trainer's state back);
* train → rollout = offload (the trainer's state to pinned CPU memory) + sync (engine weights resumed, the
  new version pushed, loaded and checked, KV cache resumed, swap guard).

On CPU, offload and onload are off (`train.offload` defaults to on only with CUDA: the "device" memory is
the host's). Prints tables and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

from megatron_rl.hf_checkpoint import read_hf_config
from megatron_rl.hybrid.sidecar import Sidecar
from megatron_rl.hybrid.sidecar_protocol import WeightSource
from megatron_rl.hybrid.sidecar_server import serving_in_thread
from megatron_rl.hybrid.weight_delivery import fetch_weight_files
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
TINY_CONFIG = Path(__file__).resolve().parents[1] / "megatron_rl" / "examples" / "tiny.yaml"


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

            def fetch(sidecar_url: str) -> float:
                with DiskWeightSync(SHM, work / f"run-{size}m", bucket_bytes) as weight_sync:
                    written = weight_sync.push(trainer, f"fetch-{next(counter)}")
                    (copy_written,) = written.directories
                    source = WeightSource(sidecar_url=sidecar_url, directory=written.shm_name, files=copy_written.files)
                    other_node = Path(tempfile.mkdtemp(prefix="bench-other-node-", dir=SHM))
                    try:
                        seconds = timed(lambda: fetch_weight_files(other_node, [source], None, timeout=600))
                    finally:
                        shutil.rmtree(other_node)
                return seconds

            row = {"size_m": size, "parameters": parameters, "bytes": nbytes, "bucket_bytes": bucket_bytes}
            with TensorWeightSync(client.base_url, bucket_bytes) as tensor_sync, \
                    DistributedWeightSync(client.base_url, bucket_bytes) as broadcast_sync, \
                    weight_file_server(SHM) as sidecar_url:
                row["broadcast_first_s"] = push_with(broadcast_sync)  # joins the process group first (once per run)
                measures = {"copy": copy, "stream": stream, "disk": disk, "fetch": lambda: fetch(sidecar_url),
                            "tensor": lambda: push_with(tensor_sync), "broadcast": lambda: push_with(broadcast_sync)}
                # round-robin, so that other processes' load falls on every path alike; the best of each is kept
                for _ in range(repeats):
                    for path, measure in measures.items():
                        row[f"{path}_s"] = min(row.get(f"{path}_s", float("inf")), measure())
            row["disk_write_s"] = disk.write_seconds
    for path in ("stream", "disk", "fetch", "tensor", "broadcast"):
        row[f"{path}_ratio"] = row[f"{path}_s"] / row["copy_s"]
    print(f"  copy {row['copy_s']:.3f} s, stream {row['stream_s']:.3f} s, disk {row['disk_s']:.3f} s, "
          f"fetch {row['fetch_s']:.3f} s, tensor {row['tensor_s']:.3f} s, broadcast {row['broadcast_s']:.3f} s "
          f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    return row


@contextlib.contextmanager
def weight_file_server(shm_dir: Path):
    """Another process serving the weight files below `shm_dir` with a sidecar's control API (no engine, no
    token), as another node's sidecar would; yields its URL."""
    context = multiprocessing.get_context("spawn")
    urls = context.Queue()
    server = context.Process(target=_serve_weight_files, args=(str(shm_dir), urls), daemon=True)
    server.start()
    try:
        yield urls.get(timeout=60)
    finally:
        server.terminate()
        server.join(10)


def _serve_weight_files(shm_dir: str, urls) -> None:
    sidecar = Sidecar(lambda port: None, pod_name="bench-node-0", engine_kind="embedded", shm_dir=shm_dir)
    with serving_in_thread(sidecar) as url:
        urls.put(url)
        threading.Event().wait()


def write_trainable_model(directory: Path, size: int) -> Path:
    """A random Llama model of about `size` M parameters with the tiny-digits tokenizer (the echo task's),
    saved as a HF directory the trainer and the engine both load."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megatron_rl.builtin_models import tiny_digits_tokenizer

    hidden, intermediate, layers, vocab = SHAPES[size]
    tokenizer = tiny_digits_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def measure_phase_switch(size: int, iterations: int, weight_sync: str, work: Path) -> dict:
    model_dir = write_trainable_model(work / f"trainable-{size}m", size)
    run_dir = work / f"phase-run-{size}m"
    command = [sys.executable, "-m", "megatron_rl.cli", "train", "--config", str(TINY_CONFIG), "--run-dir",
               str(run_dir), "--iterations", str(iterations), f"model.hf_path={model_dir}",
               f"hybrid.weight_sync={weight_sync}", "data.prompts_per_iteration=4", "rollout.samples_per_prompt=2",
               "train.optimizer_steps_per_iteration=1", "train.micro_batch_size=8", "eval.interval=0",
               "train.save_final=false", "logging.tensorboard=false"]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"the {size}M phase-switch run failed:\n{finished.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations_done = [record for record in records if "sync_seconds" in record]  # not the evaluation lines
    steady = [record for record in iterations_done if record["iteration"] >= 2] or iterations_done

    def median(key: str) -> float:
        return statistics.median(record.get(key, 0.0) for record in steady)

    row = {"size_m": size, "weight_sync": weight_sync, "iterations": len(steady),
           **{f"{phase}_s": median(f"{phase}_seconds") for phase in ("rollout", "release", "onload", "train",
                                                                     "offload", "sync")},
           "weight_sync_s": median("weight_sync_seconds"), "swap_guard_s": median("swap_guard_seconds"),
           "run_s": time.perf_counter() - started}
    row["rollout_to_train_s"] = row["release_s"] + row["onload_s"]
    row["train_to_rollout_s"] = row["offload_s"] + row["sync_s"]
    print(f"  phase switch: rollout → train {row['rollout_to_train_s']:.3f} s, train → rollout "
          f"{row['train_to_rollout_s']:.3f} s (run {row['run_s']:.0f} s)", flush=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50,150,500", help=f"model sizes in M parameters, of {sorted(SHAPES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timings per path and size; the best is kept")
    parser.add_argument("--bucket-mb", type=int, default=512, help="hybrid.bucket_size_mb (default 512)")
    parser.add_argument("--phase-iterations", type=int, default=3,
                        help="iterations of each phase-switch run (the first is not counted; 0 skips them)")
    parser.add_argument("--phase-weight-sync", default="disk", choices=("disk", "cuda_ipc", "nccl"),
                        help="hybrid.weight_sync of the phase-switch runs (default: disk, the config's default)")
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
        rows, phase_rows = [], []
        for size in sizes:
            rows.append(measure_size(size, args.repeats, args.bucket_mb * 2**20, work))
            if args.phase_iterations:
                phase_rows.append(measure_phase_switch(size, args.phase_iterations, args.phase_weight_sync, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started

    print()
    print("| parameters | GB (fp32) | copy | stream | disk (write + load) | fetch from another node (loopback) "
          "| tensor | broadcast (gloo) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        def cell(path: str) -> str:
            seconds = row[f"{path}_s"]
            return f"{seconds:.3f} s, {row['bytes'] / seconds / 1e9:.2f} GB/s, {row[f'{path}_ratio']:.1f}×"
        print(f"| {row['parameters'] / 1e6:.0f}M | {row['bytes'] / 1e9:.2f} "
              f"| {row['copy_s']:.3f} s, {row['bytes'] / row['copy_s'] / 1e9:.2f} GB/s | {cell('stream')} "
              f"| {cell('disk')} (write {row['disk_write_s']:.3f} s) | {cell('fetch')} | {cell('tensor')} "
              f"| {cell('broadcast')} |")
    first = ", ".join(f"{row['broadcast_first_s']:.2f} s" for row in rows)
    print(f"\nfirst broadcast push (group join included): {first}; total run {total:.0f} s")
    if phase_rows:
        print(f"\nphase switches (medians over iterations 2..{args.phase_iterations}, weight sync "
              f"{args.phase_weight_sync}):")
        print("| parameters | rollout → train (release + onload) | train → rollout (offload + sync) "
              "| of which weight push | of which swap guard | train step |")
        print("|---|---|---|---|---|---|")
        for row, phase in zip(rows, phase_rows):
            print(f"| {row['parameters'] / 1e6:.0f}M | {phase['rollout_to_train_s']:.3f} s ({phase['release_s']:.3f} + "
                  f"{phase['onload_s']:.3f}) | {phase['train_to_rollout_s']:.3f} s ({phase['offload_s']:.3f} + "
                  f"{phase['sync_s']:.3f}) | {phase['weight_sync_s']:.3f} s | {phase['swap_guard_s']:.3f} s "
                  f"| {phase['train_s']:.3f} s |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs {platform.machine()} {platform.platform()}",
                                    "torch": torch.__version__, "repeats": args.repeats, "total_s": total,
                                    "rows": rows, "phase_switch_rows": phase_rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
