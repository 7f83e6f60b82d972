"""The run configuration: one typed tree, loaded from YAML, with dotted `key=value` overrides.

Every section forbids unknown keys, so a typo fails loudly with the allowed names instead of
being ignored.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from megatron_rl.errors import UserError
from megatron_rl.reward.repetition import RepetitionConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    hf_path: str | None = Field(
        None, description="HF model directory (safetensors or one .gguf file), or builtin:NAME (see builtin_models.py)")
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_sequence_length: int = Field(4096, ge=16, description="bound on prompt + response tokens (also the model's own limit)")


class ParallelConfig(Section):
    tp: int = Field(1, ge=1, description="tensor-parallel size")
    pp: int = Field(1, ge=1, description="pipeline-parallel size")
    cp: int = Field(1, ge=1, description="context-parallel size (GPU with Transformer Engine only)")


class RolloutConfig(Section):
    engine: Literal["embedded", "sglang"] = "embedded"
    engine_url: str | None = Field(
        None, description="a running engine (SGLang or `megatron-rl engine serve`); unset: start the embedded engine")
    engine_max_running_requests: int = Field(64, ge=1, description="batch bound of the embedded engine this run starts")
    engine_start_timeout_s: float = Field(300.0, gt=0.0)
    seed: int | None = Field(1234, description="per-request sampling seeds derive from it; unset: unseeded sampling")
    deterministic_inference: bool = Field(
        False, description="the engine's --enable-deterministic-inference: results independent of the batch (slower)")
    request_timeout_s: float = Field(600.0, gt=0.0, description="bound on one generation request")
    samples_per_prompt: int = Field(8, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    sglang_args: list[str] = Field(default_factory=list, description="extra `sglang.launch_server` arguments")


class AlgoConfig(Section):
    loss: Literal["k15", "grpo", "ppo_clip", "rest"] = Field(
        "k15", description="rest: fit the positive samples only (ReST-style baseline, paper Fig. 10)")
    tau: float = Field(0.1, gt=0.0, description="k1.5 regulariser weight on the squared log-ratio")
    length_normalization: Literal["sum", "mean"] = "sum"
    length_penalty_weight: float = Field(0.0, ge=0.0)
    length_penalty_warmup_iterations: int = Field(0, ge=0)
    clip_eps: float = Field(0.2, gt=0.0)
    clip_eps_high: float | None = Field(None, gt=0.0)
    kl_coef: float = Field(0.0, ge=0.0)


class TrainConfig(Section):
    iterations: int = Field(10, ge=1, description="RL iterations of the run (the CLI's --iterations overrides it)")
    lr: float = Field(1e-6, gt=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    lr_decay_steps: int = Field(1000, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 disables clipping")
    optimizer_steps_per_iteration: int = Field(1, ge=1)
    reset_optimizer_each_iteration: bool = True
    micro_batch_size: int = Field(4, ge=1)
    seed: int = 1234
    offload: bool | None = Field(
        None, description="free the trainer's device memory between training phases; unset: on with CUDA, off on CPU")
    save_interval: int = Field(0, ge=0, description="checkpoint every N iterations; 0: only on pause, stop and the end")
    save_final: bool = Field(True, description="checkpoint after the last iteration")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept in RUN_DIR/checkpoints")


class SyntheticDataConfig(Section):
    """A generated prompt set, so demos and tests need no download (used when data.prompts is unset)."""

    task: Literal["arithmetic", "echo"] = "arithmetic"
    train_count: int = Field(512, ge=1)
    eval_count: int = Field(64, ge=0, description="held-out problems, disjoint from the training ones")
    seed: int = 0
    max_operand: int = Field(100, ge=1, description="arithmetic: operands in [1, max_operand]")
    operand_count: int = Field(2, ge=2, description="arithmetic: operands per problem; echo: digits per prompt")
    operations: str = Field("+-*", description="arithmetic: the operations to draw from")


class DataConfig(Section):
    prompts: str | None = Field(None, description="JSONL prompt file (format: megatron_rl/data/prompts.py)")
    eval_prompts: str | None = Field(None, description="held-out JSONL prompt file for evaluation")
    synthetic: SyntheticDataConfig | None = None
    prompts_per_iteration: int = Field(8, ge=1)
    apply_chat_template: bool = Field(True, description="format prompts with the tokenizer's chat template, if it has one")
    system_prompt: str | None = Field(None, description="system message for prompts without one (chat template only)")
    seed: int = 1234


class EvalConfig(Section):
    interval: int = Field(0, ge=0, description="evaluate every N iterations; 0: only before the first and after the last")
    max_prompts: int = Field(64, ge=1)
    max_new_tokens: int | None = Field(None, ge=1, description="unset: rollout.max_new_tokens")


class RewardConfig(Section):
    type: Literal["math"] = "math"
    workers: int = Field(0, ge=0, description="reward worker processes; 0 scores in the driver process")
    repetition: RepetitionConfig = Field(default_factory=RepetitionConfig)


class HybridConfig(Section):
    weight_sync: Literal["disk", "cuda_ipc", "nccl"] = "disk"
    bucket_size_mb: int = Field(512, ge=1, description="bound on one streamed weight bucket")
    shm_dir: str = "/dev/shm"
    # The sidecar (hybrid/sidecar.py) owns the engine process. Unset sidecar_url: the driver runs one in process.
    sidecar_url: str | None = Field(None, description="a `megatron-rl sidecar` to use (the pod's rollout container)")
    sidecar_host: str = Field("127.0.0.1", description="where `megatron-rl sidecar` listens (pod-local)")
    sidecar_port: int = Field(31000, ge=1, le=65535)
    sidecar_token_file: str | None = Field(
        None, description="file holding the control API's bearer token (else env MEGATRON_RL_SIDECAR_TOKEN)")
    pod_name: str = Field("pod-0", description="this pod's name in the run's metadata")
    engine_lifecycle: Literal["release", "restart"] = Field(
        "release", description="between rollouts: release the engine's memory, or stop it and start it again (k1.5)")
    max_engine_restarts: int = Field(5, ge=0, description="crash restarts before the sidecar gives up")
    sidecar_lease_ttl_s: int = Field(5, ge=1, description="the sidecar's record vanishes this long after it dies")


class ControlConfig(Section):
    store: Literal["memory", "etcd"] = "memory"
    etcd_endpoints: list[str] = Field(default_factory=list)
    run_name: str = "megatron-rl"
    driver_lease_ttl_s: int = Field(
        10, ge=1, description="a dead driver's run can be taken over (by a restarted trainer) this long after it died")


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    tensorboard: bool = True
    save_rollouts: bool = Field(True, description="write every sample's text and reward to RUN_DIR/rollouts/")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    hybrid: HybridConfig = Field(default_factory=HybridConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (YAML) if given, apply `key.sub=value` overrides, validate the whole tree."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        tree = _read_yaml(Path(path))
    for override in overrides:
        key, value = _parse_override(override)
        _check_key_path(key, f"override '{override}'")
        _set_dotted(tree, key, value)
    return _validate(tree, source)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections ({', '.join(Config.model_fields)})")
    return tree


def _parse_override(override: str) -> tuple[str, Any]:
    key, sep, raw_value = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{override}' is not of the form section.key=value (e.g. algo.tau=0.05)")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value  # not YAML: take the text as a plain string and let validation judge it
    return key.strip(), value


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field annotated `Section` or `Section | None`, else None (a value)."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return sections[0] if sections else None


def _check_key_path(dotted_key: str, what: str) -> None:
    model: type[BaseModel] = Config
    walked: list[str] = []
    for part in dotted_key.split("."):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(walked) or "the top level"
            raise UserError(f"{what}: unknown config key '{dotted_key}'; allowed keys under {where}: {', '.join(fields)}")
        walked.append(part)
        section = _section_type(fields[part].annotation)
        if section is not None:
            model = section
        elif part != dotted_key.split(".")[-1]:
            raise UserError(f"{what}: config key '{'.'.join(walked)}' is a value, not a section")


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    *sections, leaf = dotted_key.split(".")
    node = tree
    for section in sections:
        child = node.get(section)
        if not isinstance(child, dict):
            child = node[section] = {}
        node = child
    node[leaf] = value


def _validate(tree: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(tree)
    except pydantic.ValidationError as error:
        raise UserError(f"config ({source}): " + "; ".join(_describe(e) for e in error.errors())) from None


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent_path = [str(part) for part in error["loc"][:-1]]
        model: type[BaseModel] = Config
        for part in parent_path:
            model = _section_type(model.model_fields[part].annotation)  # type: ignore[assignment]
        where = ".".join(parent_path) or "the top level"
        return f"unknown key '{key}'; allowed keys under {where}: {', '.join(model.model_fields)}"
    return f"'{key}': {error['msg']} (got {error.get('input')!r})"
