"""Forward (and backward) passes through megatron-core's pipeline schedules, and TP-correct log-probs.

Batches are right-padded per microbatch, with a causal mask and a loss mask that is zero on
prompt and padding tokens. THD packing would waste less compute but needs Transformer Engine's
attention; padding is exact on every backend, and microbatches are formed from length-sorted
samples so the padding stays small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

PAD_TOKEN_ID = 0


@dataclass
class Microbatch:
    """One padded microbatch; `payload` carries per-sample tensors for the output function."""

    token_ids: torch.Tensor  # [b, s] long
    sample_indices: list[int]  # positions of these samples in the caller's batch
    payload: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def labels(self) -> torch.Tensor:
        """The next token at every position (the last position's label is padding, never trained)."""
        return torch.nn.functional.pad(self.token_ids[:, 1:], (0, 1), value=PAD_TOKEN_ID)


def pad_sequences(sequences: list[list[float]] | list[list[int]], dtype: torch.dtype, length: int, value: float = 0) -> torch.Tensor:
    padded = torch.full((len(sequences), length), value, dtype=dtype)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.as_tensor(sequence, dtype=dtype)
    return padded


def make_microbatches(token_ids: list[list[int]], micro_batch_size: int, per_token: dict[str, list[list[float]]] | None = None,
                      per_sample: dict[str, torch.Tensor] | None = None, sample_indices: list[int] | None = None) -> list[Microbatch]:
    """Length-sorted, right-padded microbatches of `token_ids` (and aligned per-token/per-sample data)."""
    indices = sample_indices if sample_indices is not None else list(range(len(token_ids)))
    order = sorted(indices, key=lambda index: len(token_ids[index]))
    microbatches = []
    for start in range(0, len(order), micro_batch_size):
        chosen = order[start : start + micro_batch_size]
        length = max(len(token_ids[index]) for index in chosen)
        payload = {name: pad_sequences([values[index] for index in chosen], torch.float32, length) for name, values in (per_token or {}).items()}
        payload.update({name: values[chosen] for name, values in (per_sample or {}).items()})
        ids = pad_sequences([token_ids[index] for index in chosen], torch.long, length, PAD_TOKEN_ID)
        microbatches.append(Microbatch(token_ids=ids, sample_indices=chosen, payload=payload))
    return microbatches


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(label) per position from vocab-parallel logits [b, s, V/TP], without gathering the vocab."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # vocab_parallel_cross_entropy overwrites fp32 input in place, hence the copy.
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float().clone()
    return -vocab_parallel_cross_entropy(scaled, labels)


OutputFunction = Callable[[Microbatch, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def run_pipeline(model, microbatches: list[Microbatch], output_function: OutputFunction, forward_only: bool) -> list[dict[str, Any]]:
    """Run the microbatches through megatron's schedule (any PP size).

    `output_function(microbatch, logits)` runs on the last stage and returns (loss, outputs); the
    schedule divides the loss by the number of microbatches before backward. Returns the outputs
    of each microbatch on the last pipeline stage and an empty list elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_rl.train.model import causal_attention_mask

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def forward_step(data_iterator, stage_model):
        microbatch = next(data_iterator)
        tokens = microbatch.token_ids.to(device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        output = stage_model(tokens, positions, causal_attention_mask(tokens.shape[1]).to(device))
        return output, partial(output_function, microbatch)

    max_length = max(microbatch.token_ids.shape[1] for microbatch in microbatches)
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=[model],
        num_microbatches=len(microbatches),
        seq_length=max_length,
        micro_batch_size=max(microbatch.token_ids.shape[0] for microbatch in microbatches),
        forward_only=forward_only,
    )
