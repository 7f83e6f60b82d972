"""The policy trainer: one RL iteration of optimizer steps on megatron-core, at any TP/PP/DP.

Per iteration (k1.5 §2.3.2): the current weights are the iteration's reference policy π_θi, so
reference log-probs are recomputed here first (never taken from the engine, whose numerics
differ); the optimizer state is reset (each iteration is a new optimisation problem); then the
batch is split into `optimizer_steps_per_iteration` minibatches, one optimizer step each.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_rl import algo
from megatron_rl.config import Config
from megatron_rl.errors import UserError
from megatron_rl.train.checkpoint import CheckpointManifest, load_checkpoint, save_checkpoint
from megatron_rl.train.forward import Microbatch, make_microbatches, run_pipeline, token_logprobs
from megatron_rl.train.model import ModelArchitecture, build_gpt_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainBatch:
    """What the RL loop hands the trainer: finished samples with their final rewards."""

    token_ids: list[list[int]]  # prompt + response
    loss_mask: list[list[float]]  # aligned with token_ids: 1 on response tokens to train on, 0 on prompt/old segments
    rewards: list[float]  # task reward (+ weighted length reward), one per sample
    group_ids: list[int]  # samples of the same prompt share an id
    # The engine's log-prob of each token as it sampled it, aligned with token_ids (NaN where it has none,
    # e.g. prompt tokens); optional, for comparing the engine with the trainer on the same weights.
    rollout_logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        count = len(self.token_ids)
        if not (len(self.loss_mask) == len(self.rewards) == len(self.group_ids) == count) or count == 0:
            raise ValueError("TrainBatch fields must be non-empty and of equal length")
        for tokens, mask in zip(self.token_ids, self.loss_mask):
            if len(tokens) != len(mask) or len(tokens) < 2:
                raise ValueError("every sample needs ≥ 2 tokens and a loss mask of the same length")
        if self.rollout_logprobs is not None and [len(t) for t in self.token_ids] != [len(l) for l in self.rollout_logprobs]:
            raise ValueError("rollout_logprobs must hold one value per token of every sample")

    def position_loss_mask(self, index: int) -> list[float]:
        """The mask per position: position t predicts token t+1, so it takes token t+1's mask."""
        return list(self.loss_mask[index][1:]) + [0.0]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class PolicyTrainer:
    """Owns this rank's model stage, the optimizer and the LR schedule. Every method is collective."""

    def __init__(self, config: Config, arch: ModelArchitecture, hf_source: Path):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        self.config = config
        self.arch = arch
        self.hf_source = hf_source
        dtype = DTYPES[config.model.dtype]
        self.model = build_gpt_model(arch, dtype)
        module = Float16Module(self.model.config, self.model) if dtype == torch.bfloat16 else self.model
        self.ddp_model = DistributedDataParallel(
            config=self.model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False),
            module=module,
        )
        # DP all-reduce and the tied-embedding all-reduce across pipeline stages.
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.model.config.no_sync_func = self.ddp_model.no_sync
        train = config.train
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
                clip_grad=train.grad_clip, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                use_distributed_optimizer=False,
            ),
            [self.ddp_model],
        )
        self.lr_scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if train.lr_warmup_steps else train.lr,
            max_lr=train.lr,
            min_lr=train.min_lr,
            lr_warmup_steps=train.lr_warmup_steps,
            lr_decay_steps=max(train.lr_decay_steps, train.lr_warmup_steps + 1),
            lr_decay_style=train.lr_decay_style,
            start_wd=train.weight_decay,
            end_wd=train.weight_decay,
            wd_incr_steps=max(train.lr_decay_steps, 1),
            wd_incr_style="constant",
        )
        self.data_parallel_rank = parallel_state.get_data_parallel_rank()
        self.data_parallel_size = parallel_state.get_data_parallel_world_size()
        self.is_last_stage = parallel_state.is_pipeline_last_stage()
        self.skipped_steps = 0

    # --- weights --------------------------------------------------------------------------

    def load_hf(self, reader) -> None:
        from megatron_rl.train.convert import load_hf_weights

        load_hf_weights(self.model, reader, self.arch)
        # With bf16 the optimizer keeps fp32 main copies made at construction: refresh them.
        self.optimizer.reload_model_params()

    def save(self, directory: str | Path, iteration: int, extra: dict | None = None,
             run_files: dict[str, bytes] | None = None) -> None:
        # The LR schedule's progress is not part of the optimizer's state: keep it in the manifest.
        trainer_state = {"lr_scheduler": self.lr_scheduler.state_dict(), "skipped_steps": self.skipped_steps}
        save_checkpoint(directory, self.model, self.arch, self.hf_source, self.optimizer, iteration,
                        {**(extra or {}), "trainer": trainer_state}, run_files)

    def load(self, directory: str | Path, with_optimizer: bool = True) -> CheckpointManifest:
        manifest = load_checkpoint(directory, self.model, self.optimizer if with_optimizer else None)
        if not with_optimizer:
            self.optimizer.reload_model_params()
        if manifest.model_architecture != self.arch:
            raise UserError(f"checkpoint {directory} is of another model architecture than the run's")
        trainer_state = manifest.extra.get("trainer")
        if with_optimizer and trainer_state is not None:
            self.lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
            self.skipped_steps = trainer_state["skipped_steps"]
        return manifest

    def reset_optimizer_state(self) -> None:
        """Forget Adam moments (state is lazily re-created at the next step)."""
        for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            optimizer.optimizer.state.clear()

    # --- forward passes ---------------------------------------------------------------------

    def _local_indices(self, count: int) -> list[int]:
        return [index for index in range(count) if index % self.data_parallel_size == self.data_parallel_rank]

    @torch.no_grad()
    def compute_logprobs(self, token_ids: list[list[int]], indices: list[int] | None = None,
                         temperature: float | None = None) -> dict[int, torch.Tensor]:
        """log π(token t+1 | tokens ≤ t) for t < len−1, per sample, at the rollout temperature (or `temperature`).

        Computed on the last pipeline stage (an empty dict elsewhere), for this DP rank's samples
        unless `indices` says which.
        """
        indices = self._local_indices(len(token_ids)) if indices is None else indices
        temperature = temperature or self.config.rollout.temperature or 1.0

        def keep_logprobs(microbatch: Microbatch, logits: torch.Tensor):
            logprobs = token_logprobs(logits, microbatch.labels.to(logits.device), temperature).float().cpu()
            per_sample = {index: logprobs[row, : len(token_ids[index]) - 1] for row, index in enumerate(microbatch.sample_indices)}
            return logits.sum() * 0.0, {"logprobs": per_sample}

        self.ddp_model.eval()
        outputs = run_pipeline(self.ddp_model, make_microbatches(token_ids, self.config.train.micro_batch_size, sample_indices=indices), keep_logprobs, forward_only=True)
        return {index: values for output in outputs for index, values in output["logprobs"].items()}

    # --- training -----------------------------------------------------------------------------

    def _advantages(self, batch: TrainBatch) -> torch.Tensor:
        rewards = torch.tensor(batch.rewards, dtype=torch.float32)
        group_ids = torch.tensor(batch.group_ids, dtype=torch.long)
        if self.config.algo.loss == "grpo":
            return algo.group_normalized_advantages(rewards, group_ids)
        if self.config.algo.loss == "rest":  # no baseline: a 0/1 weight marks the samples to imitate
            return (rewards > 0).float()
        return algo.group_mean_baseline(rewards, group_ids)

    def _loss(self, logprobs, reference_logprobs, loss_mask, advantages) -> algo.LossOutput:
        settings = self.config.algo
        if settings.loss == "k15":
            return algo.k15_loss(logprobs, reference_logprobs, loss_mask, advantages, settings.tau, settings.length_normalization)
        if settings.loss == "rest":
            return algo.rest_loss(logprobs, loss_mask, advantages, settings.length_normalization)
        if settings.loss == "ppo_clip":
            return algo.ppo_clip_loss(logprobs, reference_logprobs, loss_mask, advantages, settings.clip_eps, settings.clip_eps_high, settings.length_normalization)
        return algo.grpo_loss(logprobs, reference_logprobs, reference_logprobs, loss_mask, advantages, settings.clip_eps, settings.kl_coef, settings.length_normalization)

    def train_iteration(self, batch: TrainBatch) -> dict[str, float]:
        """Reference log-probs, optimizer reset, then the optimizer steps; returns averaged metrics."""
        train = self.config.train
        local = self._local_indices(len(batch.token_ids))
        if len(local) < train.optimizer_steps_per_iteration:
            raise UserError(
                f"{len(batch.token_ids)} samples over {self.data_parallel_size} data-parallel ranks cannot fill "
                f"train.optimizer_steps_per_iteration={train.optimizer_steps_per_iteration} steps; lower it or sample more"
            )
        # π_θi for the whole iteration: for PPO/GRPO these are also the behaviour ("old") log-probs.
        reference = self.compute_logprobs(batch.token_ids, local)
        if train.reset_optimizer_each_iteration:
            self.reset_optimizer_state()
        advantages = self._advantages(batch)
        position_masks = {index: batch.position_loss_mask(index) for index in local}
        reference_lists = {index: reference[index].tolist() for index in reference}
        steps = [local[step :: train.optimizer_steps_per_iteration] for step in range(train.optimizer_steps_per_iteration)]
        step_metrics = [self._optimizer_step(batch, indices, position_masks, reference_lists, advantages) for indices in steps]
        metrics = {key: sum(m[key] for m in step_metrics) / len(step_metrics) for key in step_metrics[0] if key != "skipped"}
        metrics["skipped_steps"] = float(sum(m["skipped"] for m in step_metrics))
        if batch.rollout_logprobs is not None:
            metrics.update(self._share_from_last_stage(self._rollout_logprob_gap(batch, reference)))
        return metrics

    def _rollout_logprob_gap(self, batch: TrainBatch, reference: dict[int, torch.Tensor]) -> dict[str, float]:
        """Mean |engine log-prob − trainer log-prob| over this rank's trained tokens.

        Both come from the same weights (the engine sampled with version i−1, which the trainer holds
        as the iteration's reference), so a gap well above the engines' numerical noise means the
        weights the engine served were not the trainer's: a failed or garbled weight sync.
        """
        gaps = []
        for index, trainer_logprobs in reference.items():
            engine = torch.tensor(batch.rollout_logprobs[index][1:], dtype=torch.float32)  # token t+1 at position t
            trained = torch.tensor(batch.loss_mask[index][1:]) > 0
            keep = trained & torch.isfinite(engine)
            gaps.append((engine[keep] - trainer_logprobs[keep]).abs())
        gap = torch.cat(gaps) if gaps else torch.zeros(0)
        return {"rollout_logprob_gap": gap.mean().item() if gap.numel() else 0.0} if self.is_last_stage else {}

    def _optimizer_step(self, batch: TrainBatch, indices: list[int], position_masks, reference_lists, advantages) -> dict[str, float]:
        temperature = self.config.rollout.temperature or 1.0
        microbatches = make_microbatches(
            batch.token_ids, self.config.train.micro_batch_size,
            per_token={"loss_mask": position_masks, "reference_logprobs": reference_lists} if self.is_last_stage else {"loss_mask": position_masks},
            per_sample={"advantages": advantages}, sample_indices=indices,
        )
        sample_count = len(indices)
        microbatch_count = len(microbatches)

        def loss_function(microbatch: Microbatch, logits: torch.Tensor):
            device = logits.device
            logprobs = token_logprobs(logits, microbatch.labels.to(device), temperature)
            output = self._loss(
                logprobs, microbatch.payload["reference_logprobs"].to(device), microbatch.payload["loss_mask"].to(device),
                microbatch.payload["advantages"].to(device),
            )
            # The schedule divides by the microbatch count; this makes the total the minibatch mean.
            loss = output.per_sample_loss.sum() * (microbatch_count / sample_count)
            # Means are weighted by the microbatch's share of samples (summed later); maxima stay maxima.
            weight = len(microbatch.sample_indices) / sample_count
            reported = {"loss": output.per_sample_loss.sum().detach() / sample_count}
            reported.update({name: value.detach() * (1.0 if name.endswith("_max") else weight) for name, value in output.metrics.items()})
            return loss, reported

        return self.run_optimizer_step(microbatches, loss_function)

    def run_optimizer_step(self, microbatches: list[Microbatch], loss_function) -> dict[str, float]:
        """Forward/backward of `microbatches`, then one optimizer step (skipped on every rank if any loss is
        not finite). `loss_function(microbatch, logits) -> (loss, reported)` runs on the last stage; the
        schedule divides its loss by the microbatch count. Reported values are summed over microbatches
        (maxima for names ending in _max), shared with every rank, and returned with grad_norm, lr, skipped.
        """
        self.ddp_model.train()
        self.ddp_model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = run_pipeline(self.ddp_model, microbatches, loss_function, forward_only=False)
        metrics = {
            name: float((max if name.endswith("_max") else sum)(output[name] for output in outputs))
            for name in (outputs[0] if outputs else {})
        }
        finite = torch.tensor([float(all(math.isfinite(value) for value in metrics.values()))])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank must agree to step or to skip
        if finite.item() < 1:
            self.skipped_steps += 1
            logger.warning("non-finite loss in an optimizer step: step skipped (%d skipped so far)", self.skipped_steps)
            metrics = {name: value for name, value in metrics.items() if math.isfinite(value)}
            grad_norm, skipped = float("nan"), 1.0
        else:
            _, grad_norm, _ = self.optimizer.step()
            self.lr_scheduler.step(increment=1)
            skipped = 0.0
        metrics = self._share_from_last_stage(metrics)
        metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), lr=self.optimizer.param_groups[0]["lr"], skipped=skipped)
        return metrics

    def _share_from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics exist on the last pipeline stage; average them over DP and give them to every rank."""
        from megatron.core import parallel_state

        names = sorted(metrics)
        shared = [names if self.is_last_stage else None]
        last_stage_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast_object_list(shared, src=last_stage_rank, group=parallel_state.get_pipeline_model_parallel_group())
        names = shared[0]
        values = torch.tensor([metrics.get(name, 0.0) for name in names], dtype=torch.float64)
        dist.broadcast(values, src=last_stage_rank, group=parallel_state.get_pipeline_model_parallel_group())
        dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values /= self.data_parallel_size
        return dict(zip(names, values.tolist()))
