"""The runtime swap guard: after every weight sync, the engine must score fixed probe sequences as the trainer does.

Stale or garbled weights after a sync (an engine upgrade that renamed a parameter, a memory release
that dropped a buffer, a bucket applied twice) are the silent failure peers report most: the run goes
on and learns nothing. So after each sync the engine computes the log-probs of a few probe sequences
(prefill only: `logprob_start_len=0`, no token generated) and they are compared with the trainer's on
the weights it just pushed, computed before it was offloaded. A mean per-token gap above
`hybrid.swap_guard_threshold` stops the run with both numbers; its cost is recorded every iteration.
A probe the engine refuses (4xx: say, longer than its context) is left out; none scored stops the run.

Both sides use the raw logits (temperature 1): SGLang's prompt log-probs ignore the sampling temperature.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rl.errors import RunError
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError, GenerateRequest, SamplingParams

PROBE_TOKENS = 64  # per probe sequence: enough tokens for a stable mean, cheap to prefill


@dataclass
class ProbeReference:
    """The trainer's log-probs of the probes (token t+1 given tokens ≤ t) and how long computing them took."""

    logprobs: list[list[float]]
    seconds: float


@dataclass
class SwapCheck:
    weight_version: str
    mean_gap: float  # mean |engine − trainer| over all probe tokens
    max_gap: float
    tokens: int
    seconds: float  # trainer and engine together

    def metrics(self) -> dict[str, float]:
        return {"swap_guard_mean_gap": self.mean_gap, "swap_guard_max_gap": self.max_gap,
                "swap_guard_seconds": self.seconds}


def probe_sequences(prompts: list[list[int]], count: int) -> list[list[int]]:
    """The first `count` prompts of at least two tokens, cut to PROBE_TOKENS: the same every iteration."""
    return [ids[:PROBE_TOKENS] for ids in prompts if len(ids) >= 2][:count]


def trainer_reference(trainer, probes: list[list[int]]) -> ProbeReference:
    """Collective: the trainer's probe log-probs, on every rank (they are computed on the last pipeline stage)."""
    started = time.monotonic()
    local = trainer.compute_logprobs(probes, list(range(len(probes))), temperature=1.0)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {index: values.tolist() for index, values in local.items()})
    merged = {index: values for part in gathered for index, values in part.items()}
    return ProbeReference([merged[index] for index in range(len(probes))], time.monotonic() - started)


def check_engine(client: EngineClient, probes: list[list[int]], reference: ProbeReference, weight_version: str,
                 threshold: float) -> SwapCheck:
    """The engine's probe log-probs against the trainer's; raises RunError on a mismatch."""
    started = time.monotonic()
    gaps, refused = [], []
    for probe, trainer_logprobs in zip(probes, reference.logprobs):
        request = GenerateRequest(input_ids=probe, logprob_start_len=0, sampling_params=SamplingParams(max_new_tokens=0))
        try:
            result = client.generate([request])[0]
        except EngineError as error:
            if error.status is not None and 400 <= error.status < 500:  # e.g. longer than the engine's context
                refused.append(str(error))
                continue
            raise RunError(f"swap guard: the engine could not score a probe sequence: {error}") from None
        engine_logprobs = result.input_logprobs or []
        if len(engine_logprobs) != len(probe) or any(value is None for value in engine_logprobs[1:]):
            raise RunError(f"swap guard: the engine returned {len(engine_logprobs)} prompt log-probs for a "
                           f"{len(probe)}-token probe; it does not support logprob_start_len")
        gaps.append((torch.tensor(engine_logprobs[1:], dtype=torch.float64)
                     - torch.tensor(trainer_logprobs, dtype=torch.float64)).abs())
    if not gaps:
        raise RunError(f"swap guard: the engine refused every probe sequence (the first: {refused[0]}); fix the "
                       "engine, or turn the guard off with hybrid.swap_guard=false")
    gap = torch.cat(gaps)
    check = SwapCheck(weight_version, gap.mean().item(), gap.max().item(), gap.numel(),
                      reference.seconds + time.monotonic() - started)
    if not check.mean_gap <= threshold:  # NaN fails too
        raise RunError(
            f"swap guard: after the sync of weight version {weight_version} the engine's log-probs of "
            f"{len(gaps)} probe sequences differ from the trainer's by {check.mean_gap:.4f} per token on average "
            f"(max {check.max_gap:.4f}; hybrid.swap_guard_threshold={threshold}). The engine does not serve the "
            "trainer's weights: a failed or partial weight sync, or weights lost in a memory release. The run "
            "stops before rolling out on them; its last checkpoint is intact.")
    return check
