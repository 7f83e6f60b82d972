"""The `megatron-rl convert` commands: checks in the parent process, the work on every rank."""
from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron_rl.errors import UserError
from megatron_rl.train import parallel
from megatron_rl.train.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from megatron_rl.train.convert import iter_hf_buckets, load_hf_weights
from megatron_rl.train.forward import Microbatch, run_pipeline
from megatron_rl.hf_checkpoint import (
    SafetensorsReader, WrittenDirectory, copy_tokenizer_files, read_hf_config, resolve_hf_dir,
)
from megatron_rl.train.model import ModelArchitecture, architecture_from_hf_config, build_gpt_model, check_parallel_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _prepare_hf(hf_dir: str | Path, tp: int, pp: int) -> tuple[Path, ModelArchitecture]:
    resolved = resolve_hf_dir(hf_dir)
    arch = architecture_from_hf_config(read_hf_config(resolved))
    check_parallel_layout(arch, tp, pp)
    SafetensorsReader(resolved)  # opens every file: a corrupt one fails here, before workers start
    return resolved, arch


def _refuse_existing(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty; choose a new --out (nothing was overwritten)")
    return out


# --- hf-to-mcore -----------------------------------------------------------------------------

def hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int, pp: int, dtype: str = "float32") -> None:
    resolved, arch = _prepare_hf(hf_dir, tp, pp)
    out = _refuse_existing(out_dir)
    parallel.launch(_hf_to_mcore_rank, tp * pp, resolved, arch, out, tp, pp, dtype)
    print(f"wrote megatron checkpoint {out} (TP={tp}, PP={pp}, {arch.hf_architecture}, {arch.num_layers} layers)")


def _hf_to_mcore_rank(hf_dir: Path, arch: ModelArchitecture, out: Path, tp: int, pp: int, dtype: str) -> None:
    with parallel.model_parallel(tp, pp):
        model = build_gpt_model(arch, DTYPES[dtype])
        load_hf_weights(model, SafetensorsReader(hf_dir), arch)
        save_checkpoint(out, model, arch, hf_source=hf_dir)


# --- mcore-to-hf -----------------------------------------------------------------------------

def mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, bucket_size_mb: int = 512) -> None:
    manifest = read_manifest(mcore_dir)
    out = _refuse_existing(out_dir)
    world_size = manifest.tp * manifest.pp
    parallel.launch(_mcore_to_hf_rank, world_size, Path(mcore_dir), out, manifest.tp, manifest.pp, bucket_size_mb * 2**20)
    print(f"wrote HF model {out} from {mcore_dir} (read at TP={manifest.tp}, PP={manifest.pp})")


def _hf_dtype(hf_config: dict) -> torch.dtype | None:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)


def _mcore_to_hf_rank(mcore_dir: Path, out: Path, tp: int, pp: int, bucket_bytes: int) -> None:
    with parallel.model_parallel(tp, pp):
        arch = read_manifest(mcore_dir).model_architecture
        model = build_gpt_model(arch)
        load_checkpoint(mcore_dir, model)
        write_hf_model(model, arch, out, mcore_dir / "hf", bucket_bytes,
                       dtype=_hf_dtype(read_hf_config(mcore_dir / "hf")))


@dataclass
class WrittenModel:
    bytes: int  # the model's tensors, counted once
    directories: list[WrittenDirectory]


def write_hf_model(model, arch: ModelArchitecture, out: Path, hf_source: Path, bucket_bytes: int,
                   dtype: torch.dtype | None = None, named_parameters=None) -> WrittenModel:
    """Collective: stream this stage's weights in buckets into sharded safetensors plus an index.

    Ranks may be given different `out` directories (each node its own shared memory): every distinct
    (host, out) gets its copy of each stage some rank there holds, written by that stage's first rank there
    with TP rank 0 (data-parallel replicas hold the same weights), and its own index, config and tokenizer.
    Tensors are written in `dtype` (None: the parameters' own), read from `named_parameters` (see
    iter_hf_buckets; default: the model's).
    """
    from megatron.core import parallel_state

    stage = parallel_state.get_pipeline_model_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (socket.gethostname(), str(out), stage, tp_rank))
    me = dist.get_rank()
    copy = ranks[me][:2]
    same_copy = [rank for rank, (host, path, _, _) in enumerate(ranks) if (host, path) == copy]
    writes = me == min(rank for rank in same_copy if ranks[rank][2:] == (stage, 0))
    if me == same_copy[0]:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    weight_map: dict[str, str] = {}
    shards: dict[str, int] = {}
    total_bytes = 0
    for number, bucket in enumerate(iter_hf_buckets(model, arch, bucket_bytes, dtype=dtype, named_parameters=named_parameters)):
        file_name = f"model-stage{stage:03d}-{number:05d}.safetensors"
        if writes:
            save_file({name: tensor.cpu() for name, tensor in bucket}, str(out / file_name), metadata={"format": "pt"})
            shards[file_name] = (out / file_name).stat().st_size
        weight_map.update({name: file_name for name, _ in bucket})
        total_bytes += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
    maps: list = [None] * dist.get_world_size()
    dist.all_gather_object(maps, (stage, weight_map, total_bytes, shards))
    merged = {name: file for _, stage_map, _, _ in maps for name, file in stage_map.items()}
    model_bytes = sum({stage_of: size for stage_of, _, size, _ in maps}.values())
    if me == same_copy[0]:  # the same index, config and tokenizer in every copy
        index = {"metadata": {"total_size": model_bytes}, "weight_map": dict(sorted(merged.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        shutil.copy2(hf_source / "config.json", out / "config.json")
        copy_tokenizer_files(hf_source, out)
    dist.barrier()
    metadata = {path.name: path.stat().st_size for path in out.iterdir()
                if path.is_file() and not path.name.endswith(".safetensors")}
    directories: dict[tuple[str, str], dict[str, int]] = {}
    for (host, path, _, _), (_, _, _, written) in zip(ranks, maps):
        directories.setdefault((host, path), dict(metadata)).update(written)
    return WrittenModel(model_bytes, [WrittenDirectory(host, path, dict(sorted(files.items())))
                                      for (host, path), files in directories.items()])


# --- verify ----------------------------------------------------------------------------------

@dataclass
class VerifyResult:
    max_abs_logits_difference: float
    max_abs_logit: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_logits_difference <= self.tolerance


def verify(hf_dir: str | Path, tp: int, pp: int, tolerance: float = 1e-3, batch_size: int = 2, sequence_length: int = 32, seed: int = 0) -> VerifyResult:
    resolved, arch = _prepare_hf(hf_dir, tp, pp)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, arch.vocab_size, (batch_size, sequence_length), generator=generator)
    results = parallel.launch(_verify_rank, tp * pp, resolved, arch, tokens, tp, pp)
    differences = [result for result in results if result is not None]
    return VerifyResult(max(d[0] for d in differences), max(d[1] for d in differences), tolerance)


def megatron_full_logits(model, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, V] on the last pipeline stage (None elsewhere)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def keep_logits(microbatch: Microbatch, logits: torch.Tensor):
        return logits.sum() * 0.0, {"logits": gather_from_tensor_model_parallel_region(logits).detach().float().cpu()}

    with torch.no_grad():
        outputs = run_pipeline(model, [Microbatch(tokens, list(range(tokens.shape[0])))], keep_logits, forward_only=True)
    return outputs[0]["logits"] if outputs else None


def _verify_rank(hf_dir: Path, arch: ModelArchitecture, tokens: torch.Tensor, tp: int, pp: int):
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM

    with parallel.model_parallel(tp, pp):
        model = build_gpt_model(arch)
        load_hf_weights(model, SafetensorsReader(hf_dir), arch)
        model.eval()
        logits = megatron_full_logits(model, tokens)
        if logits is None or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        reference.eval()
        with torch.no_grad():
            expected = reference(tokens).logits.float()
        return (logits - expected).abs().max().item(), expected.abs().max().item()
