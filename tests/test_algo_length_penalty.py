"""k1.5 length penalty (paper §2.3.3)."""

import torch

from megatron_rl.algo import length_penalty_weight, length_reward


def _one_group(size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=torch.long)


def test_equal_lengths_give_zero():
    lengths = torch.tensor([100, 100, 100])
    for correct in ([True, False, True], [False, False, False]):
        reward = length_reward(lengths, torch.tensor(correct), _one_group(3))
        assert torch.all(reward == 0)


def test_correct_answers_span_plus_half_to_minus_half():
    correct = torch.tensor([True, True, True])
    reward = length_reward(torch.tensor([10, 20, 30]), correct, _one_group(3))
    torch.testing.assert_close(reward, torch.tensor([0.5, 0.0, -0.5]))


def test_wrong_answers_are_only_penalized_beyond_the_midpoint():
    correct = torch.tensor([False, False, True, False])
    reward = length_reward(torch.tensor([10, 15, 20, 30]), correct, _one_group(4))
    torch.testing.assert_close(reward, torch.tensor([0.0, 0.0, 0.0, -0.5]))


def test_wrong_answers_never_positive():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 50, (200,), generator=generator)
    correct = torch.rand(200, generator=generator) > 0.5
    group_ids = torch.randint(0, 20, (200,), generator=generator)
    reward = length_reward(lengths, correct, group_ids)
    assert torch.all(reward[~correct] <= 0)
    assert torch.all(reward >= -0.5) and torch.all(reward <= 0.5)
    assert torch.any(reward[correct] > 0)  # the inputs do exercise the positive branch


def test_groups_are_independent():
    generator = torch.Generator().manual_seed(1)
    groups = {17: 5, 3: 4, 42: 6}
    parts = {
        group: (torch.randint(1, 100, (size,), generator=generator), torch.rand(size, generator=generator) > 0.4)
        for group, size in groups.items()
    }
    alone = {
        group: length_reward(lengths, correct, _one_group(len(lengths))) for group, (lengths, correct) in parts.items()
    }

    lengths = torch.cat([parts[group][0] for group in groups])
    correct = torch.cat([parts[group][1] for group in groups])
    group_ids = torch.cat([torch.full((size,), group) for group, size in groups.items()])
    expected = torch.cat([alone[group] for group in groups])
    order = torch.randperm(len(lengths), generator=generator)
    shuffled = length_reward(lengths[order], correct[order], group_ids[order])
    torch.testing.assert_close(shuffled, expected[order])


def test_warmup_is_a_step():
    weights = [length_penalty_weight(iteration, 0.1, warmup_iterations=3) for iteration in range(6)]
    assert weights == [0.0, 0.0, 0.0, 0.1, 0.1, 0.1]
    assert length_penalty_weight(0, 0.1, warmup_iterations=0) == 0.1
