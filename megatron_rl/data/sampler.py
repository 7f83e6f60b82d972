"""Which prompts each RL iteration trains on."""
from __future__ import annotations

import random


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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "prompt_count": self.prompt_count}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["prompt_count"] != self.prompt_count:
            raise ValueError(f"sampler state is for {state['prompt_count']} prompts with seed {state['seed']}, "
                             f"not {self.prompt_count} with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
