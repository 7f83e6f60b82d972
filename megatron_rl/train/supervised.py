"""What SFT (train/sft.py) and DPO (train/dpo.py) share: their config, where the weights start, the
optimizer-step schedule, and the run itself (every rank: load weights, train, save a checkpoint).

Both reuse the RL trainer (`PolicyTrainer`: megatron-core model at any TP/PP, optimizer, LR schedule,
log-probs, checkpoints); they differ only in how one optimizer step's loss is formed. The product is a
megatron-rl checkpoint without optimizer state (`--out`), whose run/ holds the config and per-step metrics.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import pydantic
import yaml
from pydantic import Field

from megatron_rl.config import Config, ModelConfig, ParallelConfig, Section, TrainConfig, _parse_override, _read_yaml, _set_dotted
from megatron_rl.errors import UserError
from megatron_rl.train.checkpoint import read_manifest

# TrainConfig fields that only mean something in an RL run.
RL_ONLY_TRAIN_FIELDS = ("iterations", "optimizer_steps_per_iteration", "reset_optimizer_each_iteration", "offload",
                        "save_interval", "save_final", "keep_checkpoints")


class ResponseDataConfig(Section):
    train_file: str = Field(description="JSONL of training records (format: megatron_rl/data/sft_data.py)")
    epochs: int = Field(1, ge=1, description="passes over train_file")
    batch_size: int = Field(32, ge=1, description="records per optimizer step (DPO: pairs)")
    seed: int = Field(1234, description="the order of records in each epoch")
    apply_chat_template: bool = Field(True, description="format prompts with the tokenizer's chat template, if any")
    system_prompt: str | None = Field(None, description="system message for prompts without one (chat template only)")


class SupervisedConfig(Section):
    """model / parallel / train as in the RL config (train: the optimizer and LR schedule fields only)."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(lr=1e-5))
    data: ResponseDataConfig
    init_checkpoint: str | None = Field(
        None, description="start from this megatron-rl checkpoint (any TP/PP) instead of model.hf_path's weights")

    @pydantic.model_validator(mode="after")
    def _optimizer_fields_only(self) -> SupervisedConfig:
        used = sorted(set(RL_ONLY_TRAIN_FIELDS) & self.train.model_fields_set)
        if used:
            raise ValueError(f"train.{', train.'.join(used)} belong to RL runs; remove them (passes over the data: "
                             "data.epochs, records per optimizer step: data.batch_size)")
        if (self.model.hf_path is None) == (self.init_checkpoint is None):
            raise ValueError("give exactly one of model.hf_path (a HF model or builtin:NAME) and init_checkpoint "
                             "(a megatron-rl checkpoint) to start from")
        return self

    def trainer_config(self) -> Config:
        """The RL config tree the trainer reads its model, parallel and optimizer settings from."""
        return Config(model=self.model, parallel=self.parallel, train=self.train)


ConfigType = TypeVar("ConfigType", bound=SupervisedConfig)


def load_supervised_config(root: type[ConfigType], path: str | Path | None, overrides: list[str]) -> ConfigType:
    """YAML at `path` plus dotted `key=value` overrides, validated as `root`."""
    tree: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(tree, key, value)
    try:
        return root.model_validate(tree)
    except pydantic.ValidationError as error:
        problems = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"]) or "the config"
            hint = " (unknown key)" if problem["type"] == "extra_forbidden" else ""
            problems.append(f"'{key}': {problem['msg'].removeprefix('Value error, ')}{hint}")
        raise UserError(f"{root.__name__} ({path or 'overrides'}): " + "; ".join(problems)) from None


@dataclass(frozen=True)
class StartingWeights:
    """Where training starts: HF files (config, tokenizer) and either HF weights or a megatron-rl checkpoint."""

    hf_dir: Path  # config.json and tokenizer files (and the weights, without a checkpoint)
    checkpoint: Path | None


def starting_weights(config: SupervisedConfig) -> StartingWeights:
    from megatron_rl.hf_checkpoint import resolve_hf_dir

    if config.init_checkpoint is not None:
        read_manifest(config.init_checkpoint)  # verifies it
        return StartingWeights(Path(config.init_checkpoint) / "hf", Path(config.init_checkpoint))
    return StartingWeights(resolve_hf_dir(config.model.hf_path), None)


def context_length(config: SupervisedConfig, hf_dir: Path) -> int:
    """Bound on prompt + response tokens: model.max_sequence_length, or the model's own if smaller."""
    from megatron_rl.hf_checkpoint import read_hf_config
    from megatron_rl.train.model import architecture_from_hf_config

    architecture = architecture_from_hf_config(read_hf_config(hf_dir))
    return min(config.model.max_sequence_length, architecture.max_position_embeddings)


def step_batches(count: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Record indices of each optimizer step: every epoch a new shuffled order, cut into batches (the last
    one of an epoch may be smaller)."""
    generator = random.Random(seed)
    steps = []
    for _ in range(epochs):
        order = list(range(count))
        generator.shuffle(order)
        steps.extend(order[start: start + batch_size] for start in range(0, count, batch_size))
    return steps


def refuse_existing_output(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} exists; choose a new --out (nothing was overwritten)")
    return out


# A trainer class: PolicyTrainer subclass with prepare(data) and train_step(data, indices) -> metrics.
TrainerFactory = Callable[..., Any]


def run_supervised(trainer_class: TrainerFactory, config: SupervisedConfig, data: list, steps: list[list[int]],
                   out: Path, kind: str, log_every: int = 10) -> list[dict[str, float]]:
    """Train on `tp × pp` ranks and save the checkpoint `out`; returns the metrics of every step."""
    from megatron_rl.hf_checkpoint import read_hf_config
    from megatron_rl.train import parallel
    from megatron_rl.train.model import architecture_from_hf_config, check_parallel_layout

    start = starting_weights(config)
    architecture = architecture_from_hf_config(read_hf_config(start.hf_dir))
    check_parallel_layout(architecture, config.parallel.tp, config.parallel.pp)
    results = parallel.launch(_train_on_rank, config.parallel.tp * config.parallel.pp, trainer_class, config, start,
                              data, steps, out, kind, log_every)
    return results[0]


def _train_on_rank(trainer_class, config: SupervisedConfig, start: StartingWeights, data: list,
                   steps: list[list[int]], out: Path, kind: str, log_every: int) -> list[dict[str, float]]:
    import torch.distributed as dist

    from megatron_rl.hf_checkpoint import SafetensorsReader, read_hf_config
    from megatron_rl.train import parallel
    from megatron_rl.train.checkpoint import save_checkpoint
    from megatron_rl.train.model import architecture_from_hf_config

    with parallel.model_parallel(config.parallel.tp, config.parallel.pp, seed=config.train.seed):
        architecture = architecture_from_hf_config(read_hf_config(start.hf_dir))
        trainer = trainer_class(config, architecture, start.hf_dir)
        if start.checkpoint is not None:
            trainer.load(start.checkpoint, with_optimizer=False)
        else:
            trainer.load_hf(SafetensorsReader(start.hf_dir))
        if trainer.data_parallel_size > config.data.batch_size:
            raise UserError(f"data.batch_size={config.data.batch_size} is smaller than the {trainer.data_parallel_size} "
                            "data-parallel ranks; raise it")
        trainer.prepare(data)
        history = []
        for number, indices in enumerate(steps, start=1):
            if len(indices) < trainer.data_parallel_size:  # an epoch's small last batch cannot feed every rank
                continue
            metrics = {"step": number, **trainer.train_step(data, indices)}
            history.append(metrics)
            if dist.get_rank() == 0 and (number % log_every == 0 or number == len(steps)):
                shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items()
                                  if name != "step" and isinstance(value, float) and math.isfinite(value))
                print(f"{kind} step {number}/{len(steps)}: {shown}", flush=True)
        run_files = {
            "config.yaml": yaml.safe_dump(config.model_dump(), sort_keys=False).encode(),
            "metrics.jsonl": "".join(json.dumps(record) + "\n" for record in history).encode(),
        }
        save_checkpoint(out, trainer.model, architecture, start.hf_dir, optimizer=None, iteration=len(history),
                        extra={kind: {"steps": len(history), "records": len(data)}}, run_files=run_files)
        return history


def local_share(indices: list[int], data_parallel_rank: int, data_parallel_size: int) -> list[int]:
    """This DP rank's part of a step's records."""
    return [index for position, index in enumerate(indices) if position % data_parallel_size == data_parallel_rank]
