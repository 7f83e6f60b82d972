"""Which prompts each RL iteration trains on: uniform, curriculum and prioritized sampling (k1.5 §2.3.4).

A prompt record's `difficulty` is its pass rate (`megatron-rl data difficulty` writes it): 1.0 is always
solved, 0.0 never, so a *low* value is a *hard* prompt.

* uniform (`PromptSampler`): every epoch visits every prompt once, in a fresh order.
* curriculum (`CurriculumSampler`): a warm-up phase on every prompt (the paper's ablation, Fig. 9) or on the
  easy ones only, then only the hard ones (pass rate below `hard_below`). The switch comes after
  `switch_iteration × data.prompts_per_iteration` drawn prompts.
* prioritized (`PrioritizedSampler`): each draw picks prompt i with probability ∝ max(1 − s_i, priority_floor),
  independently (with replacement), where s_i is prompt i's success rate: its `difficulty` (or
  `initial_success_rate`) until `record_outcomes` updates it online. With a curriculum, the prioritized
  draw happens inside the current phase's pool ("used in addition to the curriculum").

Every random choice is a function of (seed, draw number) only, and `state_dict()` holds the draw counters
and the tracked success rates, so a resumed run draws exactly what an uninterrupted one would.
`record_outcomes(prompt_index, successes, samples)` feeds a prompt's rollout results back; samplers that do
not use them accept and ignore them, so the caller need not know which sampler it has.
"""
from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Sequence
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from megatron_rl.errors import UserError


class CurriculumConfig(BaseModel):
    """`data.sampling.curriculum`: warm up, then train on hard prompts only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    switch_iteration: int = Field(24, ge=0, description="iterations of warm-up before only hard prompts are drawn "
                                                        "(the paper's ablation switches at 24)")
    hard_below: float = Field(0.5, gt=0.0, le=1.0, description="a prompt is hard when its difficulty (pass rate) is "
                                                               "below this")
    warmup: Literal["all", "easy"] = Field("all", description="the warm-up pool: every prompt (the paper's ablation) "
                                                              "or only the easy ones")


class PrioritizedConfig(BaseModel):
    """`data.sampling.prioritized`: draw weak prompts more often."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_success_rate: float = Field(0.5, ge=0.0, le=1.0, description="success rate of a prompt with no "
                                                                         "difficulty, until its first outcome")
    smoothing: float = Field(0.5, gt=0.0, le=1.0, description="weight of the newest outcomes: s ← (1 − a)·s + "
                                                              "a·successes/samples; 1 keeps only the latest")
    priority_floor: float = Field(0.01, gt=0.0, le=1.0, description="lower bound on the weight 1 − s, so solved "
                                                                    "prompts are still revisited now and then")


class SamplingConfig(BaseModel):
    """`data.sampling`: uniform when neither is set; both set: prioritized draws inside the curriculum's pools."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    curriculum: CurriculumConfig | None = None
    prioritized: PrioritizedConfig | None = None


class Sampler(Protocol):
    def next_indices(self, count: int) -> list[int]: ...
    def record_outcomes(self, prompt_index: int, successes: int, samples: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def _check_outcomes(prompt_count: int, prompt_index: int, successes: int, samples: int) -> None:
    if not 0 <= prompt_index < prompt_count:
        raise ValueError(f"prompt_index {prompt_index} is outside [0, {prompt_count})")
    if samples < 1 or not 0 <= successes <= samples:
        raise ValueError(f"need 0 ≤ successes ≤ samples and samples ≥ 1 (got {successes} of {samples})")


def _check_state(state: dict, kind: str, seed: int, prompt_count: int) -> None:
    found = state.get("kind", "uniform")
    if found != kind:
        raise ValueError(f"sampler state is for {found} sampling, not {kind}; resume with the sampling settings "
                         "the run was started with (data.sampling)")
    if state["seed"] != seed or state["prompt_count"] != prompt_count:
        raise ValueError(f"sampler state is for {state['prompt_count']} prompts with seed {state['seed']}, "
                         f"not {prompt_count} with seed {seed}")


class PromptSampler:
    """Uniform sampling without replacement: each epoch visits every prompt once, in a fresh order.

    The order of epoch e is a function of (seed, e) only, so `state_dict()` (epoch and position) is all
    a resumed run needs to continue with exactly the prompts an uninterrupted run would have drawn.
    """

    def __init__(self, prompt_count: int, seed: int):
        if prompt_count < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompt_count = prompt_count
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.prompt_count))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_indices(self, count: int) -> list[int]:
        """`count` prompt indices; an epoch boundary inside the draw continues in the next epoch's order."""
        indices = []
        while len(indices) < count:
            if self.position == self.prompt_count:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(count - len(indices), self.prompt_count - self.position)
            indices.extend(self._order[self.position: self.position + take])
            self.position += take
        return indices

    def record_outcomes(self, prompt_index: int, successes: int, samples: int) -> None:
        """Uniform sampling does not depend on outcomes; the arguments are only checked."""
        _check_outcomes(self.prompt_count, prompt_index, successes, samples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "prompt_count": self.prompt_count}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "uniform", self.seed, self.prompt_count)
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)


class PrioritizedSampler:
    """Draw i with probability ∝ max(1 − s_i, priority_floor); s_i tracked online (see the module docstring)."""

    def __init__(self, prompt_count: int, seed: int, initial_success_rates: Sequence[float],
                 config: PrioritizedConfig = PrioritizedConfig()):
        if prompt_count < 1:
            raise ValueError("PrioritizedSampler needs at least one prompt")
        if len(initial_success_rates) != prompt_count:
            raise ValueError(f"{len(initial_success_rates)} initial success rates for {prompt_count} prompts")
        self.prompt_count = prompt_count
        self.seed = seed
        self.config = config
        self.success_rates = [float(rate) for rate in initial_success_rates]
        self.draws = 0

    def weights(self, pool: Sequence[int] | None = None) -> list[float]:
        """The unnormalised draw weight of each prompt of `pool` (default: every prompt)."""
        pool = range(self.prompt_count) if pool is None else pool
        return [max(1.0 - self.success_rates[index], self.config.priority_floor) for index in pool]

    def next_indices(self, count: int, pool: Sequence[int] | None = None) -> list[int]:
        """`count` independent draws from `pool` (default: every prompt)."""
        pool = range(self.prompt_count) if pool is None else pool
        cumulative = list(itertools.accumulate(self.weights(pool)))
        total = cumulative[-1]
        indices = []
        for _ in range(count):
            point = random.Random(f"{self.seed}:prioritized:{self.draws}").random() * total
            # min(): a point within rounding of the total would otherwise fall past the last bucket.
            indices.append(pool[min(bisect.bisect_right(cumulative, point), len(pool) - 1)])
            self.draws += 1
        return indices

    def record_outcomes(self, prompt_index: int, successes: int, samples: int) -> None:
        _check_outcomes(self.prompt_count, prompt_index, successes, samples)
        blend = self.config.smoothing
        self.success_rates[prompt_index] = (1.0 - blend) * self.success_rates[prompt_index] + blend * successes / samples

    def state_dict(self) -> dict:
        return {"kind": "prioritized", "seed": self.seed, "prompt_count": self.prompt_count, "draws": self.draws,
                "success_rates": list(self.success_rates)}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "prioritized", self.seed, self.prompt_count)
        self.draws = state["draws"]
        self.success_rates = [float(rate) for rate in state["success_rates"]]


class CurriculumSampler:
    """Warm-up pool for the first `switch_after_draws` draws, the hard pool after (see the module docstring)."""

    def __init__(self, pass_rates: Sequence[float], seed: int, switch_after_draws: int,
                 config: CurriculumConfig = CurriculumConfig(), prioritized: PrioritizedSampler | None = None):
        self.prompt_count = len(pass_rates)
        self.seed = seed
        self.switch_after_draws = switch_after_draws
        hard = [index for index, rate in enumerate(pass_rates) if rate < config.hard_below]
        easy = [index for index, rate in enumerate(pass_rates) if rate >= config.hard_below]
        warmup = list(range(self.prompt_count)) if config.warmup == "all" else easy
        for name, pool in (("hard", hard), ("easy", warmup)):
            if not pool:
                raise UserError(f"data.sampling.curriculum: no {name} prompts (difficulty, the pass rate, "
                                f"{'below' if name == 'hard' else 'at least'} hard_below={config.hard_below}); "
                                "change hard_below or the prompt set")
        self.pools = (warmup, hard)
        if prioritized is not None and prioritized.prompt_count != self.prompt_count:
            raise ValueError("the prioritized sampler is for another prompt set")
        self.prioritized = prioritized
        # Uniform order inside each pool, used when there is no prioritized sampler.
        self._pool_samplers = (PromptSampler(len(warmup), seed), PromptSampler(len(hard), seed))
        self.drawn = 0

    @property
    def phase(self) -> Literal["warmup", "hard"]:
        """The phase of the next draw."""
        return "warmup" if self.drawn < self.switch_after_draws else "hard"

    def next_indices(self, count: int) -> list[int]:
        warmup_draws = max(0, min(count, self.switch_after_draws - self.drawn))
        indices = self._draw(0, warmup_draws) + self._draw(1, count - warmup_draws)
        self.drawn += count
        return indices

    def _draw(self, phase: int, count: int) -> list[int]:
        if count == 0:
            return []
        pool = self.pools[phase]
        if self.prioritized is not None:
            return self.prioritized.next_indices(count, pool)
        return [pool[position] for position in self._pool_samplers[phase].next_indices(count)]

    def record_outcomes(self, prompt_index: int, successes: int, samples: int) -> None:
        _check_outcomes(self.prompt_count, prompt_index, successes, samples)
        if self.prioritized is not None:
            self.prioritized.record_outcomes(prompt_index, successes, samples)

    def state_dict(self) -> dict:
        return {"kind": "curriculum", "seed": self.seed, "prompt_count": self.prompt_count, "drawn": self.drawn,
                "pools": [sampler.state_dict() for sampler in self._pool_samplers],
                "prioritized": None if self.prioritized is None else self.prioritized.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "curriculum", self.seed, self.prompt_count)
        if (state["prioritized"] is None) != (self.prioritized is None):
            raise ValueError("sampler state and settings disagree on prioritized sampling inside the curriculum; "
                             "resume with the data.sampling the run was started with")
        for sampler, pool_state in zip(self._pool_samplers, state["pools"]):
            sampler.load_state_dict(pool_state)
        if self.prioritized is not None:
            self.prioritized.load_state_dict(state["prioritized"])
        self.drawn = state["drawn"]


def make_sampler(data, prompts: Sequence) -> Sampler:
    """The sampler `data` (the `data` config section: sampling, seed, prompts_per_iteration) asks for over
    `prompts` (records with a `difficulty`, e.g. PromptRecord). Raises UserError when a curriculum lacks
    difficulties."""
    sampling: SamplingConfig = data.sampling
    count = len(prompts)
    if sampling.curriculum is None and sampling.prioritized is None:
        return PromptSampler(count, data.seed)
    prioritized = None
    if sampling.prioritized is not None:
        initial = [sampling.prioritized.initial_success_rate if prompt.difficulty is None else prompt.difficulty
                   for prompt in prompts]
        prioritized = PrioritizedSampler(count, data.seed, initial, sampling.prioritized)
    if sampling.curriculum is None:
        return prioritized
    missing = [prompt for prompt in prompts if prompt.difficulty is None]
    if missing:
        raise UserError(f"data.sampling.curriculum needs a difficulty for every prompt, but {len(missing)} of {count} "
                        f"have none (e.g. '{missing[0].id}'); estimate them with `megatron-rl data difficulty`")
    return CurriculumSampler([prompt.difficulty for prompt in prompts], data.seed,
                             sampling.curriculum.switch_iteration * data.prompts_per_iteration, sampling.curriculum,
                             prioritized)
