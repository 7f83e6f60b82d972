"""Reading Hugging Face model directories: config.json plus safetensors, or one GGUF file.

A GGUF model is dequantized once through transformers and cached as safetensors, so every other
piece of the system (conversion, engines, weight sync) reads one format, lazily, tensor by tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_rl.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "generation_config.json", "chat_template.jinja",
)


@dataclass
class WrittenDirectory:
    """One copy of a written HF model: on `host`, at `path`, holding `files` (name → bytes). A host's copy is
    whole when some rank of every pipeline stage runs there; otherwise it holds only its stages' shards."""

    host: str
    path: str
    files: dict[str, int]


def cache_root() -> Path:
    return Path(os.environ.get("MEGATRON_RL_CACHE", Path.home() / ".cache" / "megatron-rl"))


def resolve_hf_dir(path: str | Path) -> Path:
    """Return a directory holding config.json and safetensors for `path`, converting a GGUF once.

    `path` may also name a builtin model (`builtin:NAME`, see builtin_models.py).
    """
    from megatron_rl.builtin_models import is_builtin, resolve_builtin

    directory = resolve_builtin(str(path)) if is_builtin(path) else Path(path)
    if not directory.is_dir():
        raise UserError(f"HF model directory {directory} does not exist; pass a directory with config.json and *.safetensors (or one .gguf file)")
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return directory
    gguf_files = sorted(directory.glob("*.gguf"))
    if len(gguf_files) == 1:
        return _dequantized_gguf(gguf_files[0])
    if len(gguf_files) > 1:
        raise UserError(f"{directory} holds several .gguf files ({', '.join(f.name for f in gguf_files)}); keep exactly one")
    missing = "config.json" if not (directory / "config.json").is_file() else "*.safetensors weights"
    raise UserError(f"{directory} is not a HF model directory: {missing} missing; pass a directory with config.json and *.safetensors (or one .gguf file)")


def _dequantized_gguf(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf_file.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a core dependency
        raise UserError("reading GGUF models needs transformers, gguf and accelerate: pip install 'megatron-rl[demo]'") from None
    print(f"dequantizing {gguf_file.name} once into {target} (about a minute on 2 cores)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        # transformers refuses save_pretrained for GGUF-loaded models, though the weights are plain
        # fp32 after dequantization: write them and the config directly.
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if not (tied and name == "lm_head.weight")}
        save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(staging)
        AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).save_pretrained(staging)
        staging.rename(target)  # atomic: a half-written cache is never picked up
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and target.exists():
            return target  # another process finished the same conversion first
        raise UserError(f"could not read GGUF model {gguf_file}: {error}") from None
    return target


def read_hf_config(directory: str | Path) -> dict:
    config_path = Path(directory) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{config_path} is missing; a HF model directory needs its config.json") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{config_path}:{error.lineno}: invalid JSON ({error.msg}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    return config


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)


class SafetensorsReader:
    """Lazy access to a HF directory's tensors by name, across sharded safetensors files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._file_of: dict[str, Path] = {}
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.directory} has no *.safetensors weights")
        self._handles = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as error:
                raise UserError(f"{file} is not a readable safetensors file ({error}); re-download or re-convert the model") from None
            self._handles[file] = handle
            for name in handle.keys():
                self._file_of[name] = file

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise UserError(f"{self.directory}: tensor '{name}' is missing from the safetensors files; the checkpoint is incomplete or of another architecture")
        try:
            return self._handles[self._file_of[name]].get_tensor(name)
        except SafetensorError as error:
            raise UserError(f"{self._file_of[name]}: cannot read tensor '{name}' ({error}); the file is corrupt") from None
