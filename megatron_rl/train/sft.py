"""Supervised fine-tuning on megatron-core: long-CoT warm-up, and training on shortest-rejection data.

Each record is prompt + response; the loss is the mean negative log-likelihood over the response tokens of
an optimizer step's records (prompt tokens are masked out). Sequences are right-padded per microbatch
(train/forward.py: exact on every backend; microbatches are length-sorted so padding stays small).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_rl import algo
from megatron_rl.data.formatting import load_tokenizer
from megatron_rl.data.sft_data import SFTRecord, TrainingSequence, encode_sequences, load_records
from megatron_rl.train.forward import Microbatch, make_microbatches, token_logprobs
from megatron_rl.train.supervised import (
    SupervisedConfig,
    context_length,
    load_supervised_config,
    local_share,
    refuse_existing_output,
    run_supervised,
    starting_weights,
    step_batches,
)
from megatron_rl.train.trainer import PolicyTrainer


class SFTConfig(SupervisedConfig):
    """`megatron-rl sft --config`: data.train_file holds SFT records (response per prompt)."""


def position_loss_mask(sequence: TrainingSequence) -> list[float]:
    """Position t predicts token t+1, so it takes token t+1's mask."""
    return list(sequence.loss_mask[1:]) + [0.0]


class SFTTrainer(PolicyTrainer):
    def __init__(self, config: SupervisedConfig, arch, hf_source: Path):
        super().__init__(config.trainer_config(), arch, hf_source)
        self.supervised = config

    def prepare(self, data: list[TrainingSequence]) -> None:
        pass  # nothing to precompute

    def train_step(self, data: list[TrainingSequence], indices: list[int]) -> dict[str, float]:
        """One optimizer step on the records `indices`: token-mean NLL of their responses."""
        local = local_share(indices, self.data_parallel_rank, self.data_parallel_size)
        masks = {index: position_loss_mask(data[index]) for index in local}
        token_count = max(sum(sum(mask) for mask in masks.values()), 1.0)
        microbatches = make_microbatches([sequence.token_ids for sequence in data], self.config.train.micro_batch_size,
                                         per_token={"loss_mask": masks}, sample_indices=local)
        microbatch_count = len(microbatches)

        def loss_function(microbatch: Microbatch, logits: torch.Tensor):
            logprobs = token_logprobs(logits, microbatch.labels.to(logits.device))
            mask = microbatch.payload["loss_mask"].to(logits.device)
            ones = torch.ones(logprobs.shape[0], device=logits.device)
            # Maximum likelihood of every record's response: the positives-only loss with every sample positive.
            summed = algo.rest_loss(logprobs, mask, ones, "sum").per_sample_loss.sum()
            return summed * (microbatch_count / token_count), {"loss": summed.detach() / token_count}

        return {**self.run_optimizer_step(microbatches, loss_function), "response_tokens": float(token_count)}


def run_sft(config: SFTConfig, out: str | Path) -> list[dict[str, float]]:
    """Tokenize the records here (bad data fails before any worker starts), then train and save `out`."""
    out = refuse_existing_output(out)
    start = starting_weights(config)
    tokenizer = load_tokenizer(start.hf_dir)
    records = load_records(config.data.train_file, SFTRecord)
    encoded = encode_sequences(records, [[record.response] for record in records], tokenizer,
                               config.data.apply_chat_template, context_length(config, start.hf_dir),
                               config.data.train_file, config.data.system_prompt)
    sequences = [pair[0] for pair in encoded if pair is not None]
    steps = step_batches(len(sequences), config.data.batch_size, config.data.epochs, config.data.seed)
    print(f"sft: {len(sequences)} records ({sum(s.response_tokens for s in sequences)} response tokens), "
          f"{len(steps)} optimizer steps, TP={config.parallel.tp} PP={config.parallel.pp}", flush=True)
    history = run_supervised(SFTTrainer, config, sequences, steps, out, "sft")
    print(f"sft: wrote checkpoint {out} (loss {history[0]['loss']:.4f} → {history[-1]['loss']:.4f})", flush=True)
    return history


def load_sft_config(path: str | None, overrides: list[str]) -> SFTConfig:
    return load_supervised_config(SFTConfig, path, overrides)
