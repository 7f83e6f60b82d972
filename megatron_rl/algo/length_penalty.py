"""k1.5 length penalty (paper §2.3.3): favour short correct answers within each prompt's group."""

import torch
from torch import Tensor

from megatron_rl.algo.advantages import dense_group_index


def length_reward(lengths: Tensor, correct: Tensor, group_ids: Tensor) -> Tensor:
    """Length reward per sample, in [-0.5, 0.5]; min and max lengths are taken per group.

    lambda = 0.5 - (len - min_len) / (max_len - min_len); correct samples get lambda, incorrect
    ones min(0, lambda) so a short wrong answer is never rewarded. A group whose samples all
    have the same length gets 0.
    """
    lengths = lengths if lengths.is_floating_point() else lengths.to(torch.get_default_dtype())
    dense_index, num_groups = dense_group_index(group_ids)
    empty = lengths.new_zeros(num_groups)
    # include_self=False makes the zero initial values irrelevant to the min/max.
    min_length = empty.scatter_reduce(0, dense_index, lengths, "amin", include_self=False)[dense_index]
    max_length = empty.scatter_reduce(0, dense_index, lengths, "amax", include_self=False)[dense_index]
    length_range = max_length - min_length
    has_range = length_range > 0
    # The clamp only avoids 0/0 in groups whose result is replaced by 0 below.
    lambda_ = 0.5 - (lengths - min_length) / length_range.clamp(min=1e-12)
    lambda_ = torch.where(has_range, lambda_, torch.zeros_like(lambda_))
    return torch.where(correct.bool(), lambda_, lambda_.clamp(max=0.0))


def length_penalty_weight(iteration: int, weight: float, warmup_iterations: int) -> float:
    """Weight of the length reward at `iteration` (counted from 0): a step from 0 to `weight`.

    The paper trains without the penalty first because it slows early training, then keeps it
    constant.
    """
    return weight if iteration >= warmup_iterations else 0.0
