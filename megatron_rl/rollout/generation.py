"""Generate k samples for each of a list of prompts, to the end: the one-shot rollout (evaluation, and the
data and long2short tools).

It is one iteration of `partial.run_groups` with no token budget, over a `RolloutMaster`: one request per
sample, sent as engine slots free up, so every sample finishes, fails or is retried on its own and the
engines' continuous batching stays full. Every token must come from the weight version the caller expects.
A failed request drops its prompt's whole group (the mean-reward baseline needs all k samples), counted.
Given one `EngineClient`, it makes a one-engine master; the RL driver passes its own master, whose lost
engine is waited for (the sidecar restarting it with the same weights) and the requests sent again, so
every sample is generated exactly once however often the engine dies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from megatron_rl.data.formatting import EncodedPrompt
from megatron_rl.reward.repetition import RepetitionConfig
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.master import RolloutFailed, RolloutMaster, StaleWeightsError
from megatron_rl.rollout.partial import Group, PartialRolloutSettings, Trajectory, run_groups
from megatron_rl.rollout.protocol import SamplingParams

__all__ = ["RolloutFailed", "RolloutResult", "Sample", "StaleWeightsError", "generate_samples"]

Sample = Trajectory  # a finished trajectory of a one-shot rollout (one segment)


@dataclass
class RolloutResult:
    samples: list[Sample]
    failed_groups: int = 0  # prompts dropped because one of their requests failed
    failed_requests: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few failure messages

    @property
    def output_tokens(self) -> int:
        return sum(sample.response_length for sample in self.samples)


def generate_samples(
    engine: EngineClient | RolloutMaster,
    prompts: list[EncodedPrompt],
    samples_per_prompt: int,
    sampling: SamplingParams,
    weight_version: str,
    decode: Callable[[list[int]], str],
    *,
    seed: int | None = None,
    iteration: int = 0,
    timeout: float = 600.0,
    repetition: RepetitionConfig | None = None,
    on_sample_done: Callable[[], None] | None = None,
) -> RolloutResult:
    """`samples_per_prompt` samples of every prompt, grouped by prompt (group i = prompts[i]).

    `engine`: one engine (then `timeout` bounds a request, and a lost engine fails the rollout), or a master
    over several (which has its own timeout and recovery). Raises RolloutFailed when no engine can
    serve or every group failed, StaleWeightsError when an answer carries another weight version.
    """
    if isinstance(engine, RolloutMaster):
        master, owned = engine, False
    else:
        master, owned = RolloutMaster([engine], request_timeout=timeout), True
    settings = PartialRolloutSettings(samples_per_prompt=samples_per_prompt, groups_per_iteration=max(len(prompts), 1),
                                      max_new_tokens=max(sampling.max_new_tokens, 1))
    groups = [Group.new(index, index, prompt, iteration, samples_per_prompt, lambda _: sampling.max_new_tokens,
                        seed_key=(iteration, index))
              for index, prompt in enumerate(prompts)]
    started = time.monotonic()
    try:
        result = run_groups(master, groups, iteration, weight_version, sampling, settings, decode, seed=seed,
                            repetition=repetition,
                            on_trajectory_done=None if on_sample_done is None else lambda _: on_sample_done())
    finally:
        if owned:
            master.close()
    if prompts and len(result.failed_groups) == len(prompts):
        raise RolloutFailed(f"every rollout request failed; the first error: {result.errors[0]}")
    return RolloutResult(result.trajectories(), failed_groups=len(result.failed_groups),
                         failed_requests=result.failed_requests, seconds=time.monotonic() - started,
                         errors=result.errors)
