"""Per-sample advantages from rewards, with baselines taken over the samples of one prompt."""

import torch
from torch import Tensor


def dense_group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to 0..num_groups-1 so per-group reductions can use index_add."""
    unique_ids, dense_index = torch.unique(group_ids, return_inverse=True)
    return dense_index, unique_ids.numel()


def _group_mean(values: Tensor, dense_index: Tensor, num_groups: int) -> Tensor:
    """Mean of `values` over each sample's group, broadcast back to shape [b]."""
    sums = values.new_zeros(num_groups).index_add_(0, dense_index, values)
    counts = values.new_zeros(num_groups).index_add_(0, dense_index, torch.ones_like(values))
    return (sums / counts)[dense_index]


def _as_float(rewards: Tensor) -> Tensor:
    # Binary rewards often arrive as bool/int; averaging needs a floating dtype.
    return rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())


def group_mean_baseline(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """r_j minus the mean reward of j's group: the k1.5 estimate of tau*log Z (paper Eq. 3)."""
    rewards = _as_float(rewards)
    dense_index, num_groups = dense_group_index(group_ids)
    return rewards - _group_mean(rewards, dense_index, num_groups)


def group_normalized_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO advantage: (r - group mean) / (group population std + eps).

    A group whose rewards are all equal has zero deviation, so it yields 0 instead of 0/0.
    """
    rewards = _as_float(rewards)
    dense_index, num_groups = dense_group_index(group_ids)
    centered = rewards - _group_mean(rewards, dense_index, num_groups)
    group_std = _group_mean(centered.square(), dense_index, num_groups).sqrt()
    return centered / (group_std + eps)
