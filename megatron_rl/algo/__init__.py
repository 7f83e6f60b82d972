"""Pure RL math on tensors: no I/O, no distributed calls."""

from megatron_rl.algo.advantages import group_mean_baseline, group_normalized_advantages
from megatron_rl.algo.length_penalty import length_penalty_weight, length_reward
from megatron_rl.algo.losses import LossOutput, grpo_loss, k15_loss, ppo_clip_loss, rest_loss

__all__ = [
    "LossOutput",
    "group_mean_baseline",
    "group_normalized_advantages",
    "grpo_loss",
    "k15_loss",
    "length_penalty_weight",
    "length_reward",
    "ppo_clip_loss",
    "rest_loss",
]
