"""DPO on megatron-core (k1.5 §2.4 long2short: shortest correct response preferred over longer ones).

The reference policy is the model DPO starts from: its sequence log-probs of every chosen and rejected
response are computed once, before the first step, by the same model (no second copy in memory). A
pair's two sequences always share a microbatch, because the loss needs both.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from megatron_rl.algo.dpo import dpo_loss, sequence_logprobs
from megatron_rl.config import Section
from megatron_rl.data.formatting import load_tokenizer
from megatron_rl.data.sft_data import PreferencePair, TrainingSequence, encode_sequences, load_records
from megatron_rl.train.forward import Microbatch, make_microbatches, token_logprobs
from megatron_rl.train.sft import SFTTrainer, position_loss_mask
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

# Pair p is sequences 2p (chosen) and 2p + 1 (rejected).
Pairs = list[tuple[TrainingSequence, TrainingSequence]]


class DPOSettings(Section):
    beta: float = Field(0.1, gt=0.0, description="strength of the implicit KL bound to the reference policy")
    sft_weight: float = Field(0.0, ge=0.0, description="weight of the chosen responses' per-token NLL added to the "
                                                      "DPO loss (0: plain DPO, as in the paper)")


class DPOConfig(SupervisedConfig):
    """`megatron-rl dpo --config`: data.train_file holds preference pairs; data.batch_size counts pairs."""

    dpo: DPOSettings = Field(default_factory=DPOSettings)


class DPOTrainer(SFTTrainer):
    def prepare(self, pairs: Pairs) -> None:
        """Sequence log-probs of the reference policy (the starting weights), for this rank's pairs."""
        local = local_share(list(range(len(pairs))), self.data_parallel_rank, self.data_parallel_size)
        flat = [sequence for pair in pairs for sequence in pair]
        indices = [2 * pair + side for pair in local for side in (0, 1)]
        per_token = self.compute_logprobs([sequence.token_ids for sequence in flat], indices, temperature=1.0)
        self.reference = torch.zeros(len(flat))  # filled on the last pipeline stage, the only one that uses it
        for index, logprobs in per_token.items():
            mask = torch.tensor(position_loss_mask(flat[index])[: len(logprobs)])
            self.reference[index] = sequence_logprobs(logprobs, mask)

    def train_step(self, pairs: Pairs, indices: list[int]) -> dict[str, float]:
        """One optimizer step on the pairs `indices`: mean DPO loss."""
        local = local_share(indices, self.data_parallel_rank, self.data_parallel_size)
        flat = [sequence.token_ids for pair in pairs for sequence in pair]
        masks = {2 * pair + side: position_loss_mask(pairs[pair][side]) for pair in local for side in (0, 1)}
        size = self.config.train.micro_batch_size  # pairs per microbatch
        microbatches = [
            make_microbatches(flat, 2 * len(chunk), per_token={"loss_mask": masks},
                              per_sample={"reference": self.reference},
                              sample_indices=[2 * pair + side for pair in chunk for side in (0, 1)])[0]
            for chunk in (local[start: start + size] for start in range(0, len(local), size))
        ]
        microbatch_count, pair_count = len(microbatches), len(local)
        settings = self.supervised.dpo

        def loss_function(microbatch: Microbatch, logits: torch.Tensor):
            device = logits.device
            logprobs = token_logprobs(logits, microbatch.labels.to(device))
            policy = sequence_logprobs(logprobs, microbatch.payload["loss_mask"].to(device))
            reference = microbatch.payload["reference"].to(device)
            row = {index: position for position, index in enumerate(microbatch.sample_indices)}
            chosen = torch.tensor([row[index] for index in microbatch.sample_indices if index % 2 == 0], device=device)
            rejected = chosen.new_tensor([row[index + 1] for index in microbatch.sample_indices if index % 2 == 0])
            chosen_tokens = microbatch.payload["loss_mask"].to(device)[chosen].sum(dim=-1)
            output = dpo_loss(policy[chosen], policy[rejected], reference[chosen], reference[rejected], settings.beta,
                              settings.sft_weight, chosen_tokens)
            weight = len(chosen) / pair_count
            reported = {"loss": output.per_sample_loss.sum().detach() / pair_count,
                        **{name: value * weight for name, value in output.metrics.items()}}
            return output.per_sample_loss.sum() * (microbatch_count / pair_count), reported

        return self.run_optimizer_step(microbatches, loss_function)


def run_dpo(config: DPOConfig, out: str | Path) -> list[dict[str, float]]:
    out = refuse_existing_output(out)
    start = starting_weights(config)
    tokenizer = load_tokenizer(start.hf_dir)
    records = load_records(config.data.train_file, PreferencePair)
    encoded = encode_sequences(records, [[record.chosen, record.rejected] for record in records], tokenizer,
                               config.data.apply_chat_template, context_length(config, start.hf_dir),
                               config.data.train_file, config.data.system_prompt)
    pairs = [(sequences[0], sequences[1]) for sequences in encoded if sequences is not None]
    steps = step_batches(len(pairs), config.data.batch_size, config.data.epochs, config.data.seed)
    print(f"dpo: {len(pairs)} preference pairs, {len(steps)} optimizer steps, beta {config.dpo.beta}, "
          f"TP={config.parallel.tp} PP={config.parallel.pp}", flush=True)
    history = run_supervised(DPOTrainer, config, pairs, steps, out, "dpo")
    print(f"dpo: wrote checkpoint {out} (loss {history[0]['loss']:.4f} → {history[-1]['loss']:.4f}, preference "
          f"accuracy {history[-1]['preference_accuracy']:.2f})", flush=True)
    return history


def load_dpo_config(path: str | None, overrides: list[str]) -> DPOConfig:
    return load_supervised_config(DPOConfig, path, overrides)
