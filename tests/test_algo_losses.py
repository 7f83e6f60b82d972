"""Losses and advantages: the k1.5 loss gradient must be the paper's Eq. 3."""

import pytest
import torch

from megatron_rl.algo import (
    group_mean_baseline,
    group_normalized_advantages,
    grpo_loss,
    k15_loss,
    ppo_clip_loss,
    rest_loss,
)

BATCH, SEQ, HIDDEN, VOCAB = 6, 5, 4, 7
TAU = 0.3
GROUP_IDS = torch.tensor([3, 1, 3, 1, 7, 7])  # not contiguous, not sorted


class TinyPolicy:
    """A linear map from a fixed random context to vocab logits: a real policy with parameters."""

    def __init__(self, generator: torch.Generator):
        self.context = torch.randn(BATCH, SEQ, HIDDEN, generator=generator, dtype=torch.float64)
        self.layer = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
        with torch.no_grad():
            self.layer.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=generator, dtype=torch.float64))
            self.layer.bias.copy_(torch.randn(VOCAB, generator=generator, dtype=torch.float64))
        probs = torch.softmax(self.layer(self.context), dim=-1).detach()
        self.tokens = torch.multinomial(probs.reshape(-1, VOCAB), 1, generator=generator).reshape(BATCH, SEQ)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.layer.parameters())

    def logprobs(self, layer: torch.nn.Linear | None = None) -> torch.Tensor:
        logits = (layer or self.layer)(self.context)
        return torch.log_softmax(logits, dim=-1).gather(-1, self.tokens.unsqueeze(-1)).squeeze(-1)

    def perturbed_logprobs(self, generator: torch.Generator) -> torch.Tensor:
        reference = torch.nn.Linear(HIDDEN, VOCAB, dtype=torch.float64)
        with torch.no_grad():
            for copy, original in zip(reference.parameters(), self.layer.parameters()):
                copy.copy_(original + 0.2 * torch.randn(original.shape, generator=generator, dtype=torch.float64))
            return self.logprobs(reference)


def _setup(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    policy = TinyPolicy(generator)
    mask = (torch.rand(BATCH, SEQ, generator=generator) > 0.3).to(torch.float64)
    mask[:, 0] = 1.0  # every sample keeps at least one token here
    rewards = torch.rand(BATCH, generator=generator, dtype=torch.float64)
    return generator, policy, mask, group_mean_baseline(rewards, GROUP_IDS)


def _eq3_gradient(policy, ref_logprobs, mask, advantages, divide_by_count: bool) -> list[torch.Tensor]:
    """Minus Eq. 3, built sample by sample from grad log pi_j (grad logratio_j is the same)."""
    logprobs = policy.logprobs()
    expected = [torch.zeros_like(p) for p in policy.parameters()]
    for j in range(BATCH):
        sequence_logprob = (mask[j] * logprobs[j]).sum()
        logratio = sequence_logprob.detach() - (mask[j] * ref_logprobs[j]).sum()
        grad_logprob = torch.autograd.grad(sequence_logprob, policy.parameters(), retain_graph=True)
        scale = 1.0 / mask[j].sum() if divide_by_count else 1.0
        for total, gradient in zip(expected, grad_logprob):
            total -= scale / BATCH * (advantages[j] * gradient - TAU * logratio * gradient)
    return expected


@pytest.mark.parametrize("length_normalization", ["sum", "mean"])
def test_k15_gradient_equals_eq3(length_normalization):
    generator, policy, mask, advantages = _setup()
    ref_logprobs = policy.perturbed_logprobs(generator)
    output = k15_loss(policy.logprobs(), ref_logprobs, mask, advantages, TAU, length_normalization)
    assert output.metrics["logratio_abs_max"] > 0.1  # the regulariser really acts
    actual = torch.autograd.grad(output.loss, policy.parameters())
    expected = _eq3_gradient(policy, ref_logprobs, mask, advantages, length_normalization == "mean")
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_k15_mean_normalization_divides_squared_loss_not_logratio():
    logprobs = torch.tensor([[0.5, 0.5, 0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages = torch.tensor([1.0], dtype=torch.float64)
    output = k15_loss(logprobs, torch.zeros_like(logprobs), mask, advantages, tau=0.5, length_normalization="mean")
    # logratio = 1.5 (a sum), loss = 0.5 * 0.5 * (2 - 1.5)^2 / 3
    torch.testing.assert_close(output.per_sample_loss, torch.tensor([0.0625 / 3], dtype=torch.float64))


def test_k15_at_reference_is_mean_baseline_reinforce():
    _, policy, mask, advantages = _setup(seed=1)
    ref_logprobs = policy.logprobs().detach()
    output = k15_loss(policy.logprobs(), ref_logprobs, mask, advantages, TAU)
    assert output.metrics["logratio_abs_max"] == 0
    actual = torch.autograd.grad(output.loss, policy.parameters())
    sequence_logprobs = (mask * policy.logprobs()).sum(dim=-1)
    reinforce = torch.autograd.grad(-(advantages * sequence_logprobs).sum() / BATCH, policy.parameters())
    for got, want in zip(actual, reinforce):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


LOSSES = {
    "k15": lambda lp, other, mask, adv, norm: k15_loss(lp, other, mask, adv, TAU, norm),
    "ppo_clip": lambda lp, other, mask, adv, norm: ppo_clip_loss(lp, other, mask, adv, length_normalization=norm),
    "grpo": lambda lp, other, mask, adv, norm: grpo_loss(
        lp, other, other + 0.3, mask, adv, kl_coef=0.1, length_normalization=norm
    ),
}


@pytest.mark.parametrize("length_normalization", ["sum", "mean"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_masked_tokens_get_no_gradient(name, length_normalization):
    generator = torch.Generator().manual_seed(2)
    other = -torch.rand(4, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=generator) > 0.4
    mask[0] = True
    mask[2] = False  # a sample with nothing to train on, e.g. a masked-out old rollout segment
    # Garbage in masked positions: exp(1000) overflows, so it must never be exponentiated.
    logprobs = torch.where(mask, other + 0.1 * torch.randn(4, 6, generator=generator, dtype=torch.float64), 1000.0)
    logprobs.requires_grad_(True)
    advantages = torch.tensor([1.0, -0.5, 2.0, 0.7], dtype=torch.float64)
    output = LOSSES[name](logprobs, other, mask, advantages, length_normalization)
    (gradient,) = torch.autograd.grad(output.loss, logprobs)
    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(value) for value in output.metrics.values())
    assert output.per_sample_loss[2] == 0
    assert torch.all(gradient[~mask] == 0)
    assert gradient[mask].abs().sum() > 0


def test_ppo_clip_at_ratio_one_is_minus_mean_advantage():
    logprobs = -torch.rand(3, 4, dtype=torch.float64)
    advantages = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    output = ppo_clip_loss(logprobs, logprobs.clone(), torch.ones(3, 4), advantages)
    torch.testing.assert_close(output.per_sample_loss, -advantages)
    torch.testing.assert_close(output.loss, -advantages.mean())
    assert output.metrics["clip_fraction"] == 0
    torch.testing.assert_close(output.metrics["ratio_mean"], torch.tensor(1.0, dtype=torch.float64))


def test_ppo_clip_is_active_only_outside_the_band_in_the_advantage_direction():
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0], [1.5, 0.5, 0.9, 1.0]], dtype=torch.float64)
    old_logprobs = torch.full((2, 4), -1.0, dtype=torch.float64)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    output = ppo_clip_loss(logprobs, old_logprobs, torch.ones(2, 4), advantages, clip_eps=0.2)
    # Only ratio 1.5 with A > 0 and ratio 0.5 with A < 0 are clipped.
    torch.testing.assert_close(output.metrics["clip_fraction"], torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(output.per_sample_loss, torch.tensor([-3.8 / 4, 4.2 / 4], dtype=torch.float64))
    (gradient,) = torch.autograd.grad(output.loss, logprobs)
    clipped = torch.tensor([[True, False, False, False], [False, True, False, False]])
    assert torch.all(gradient[clipped] == 0)
    assert torch.all(gradient[~clipped] != 0)

    clip_higher = ppo_clip_loss(logprobs, old_logprobs, torch.ones(2, 4), advantages, clip_eps=0.2, clip_eps_high=0.6)
    torch.testing.assert_close(clip_higher.metrics["clip_fraction"], torch.tensor(0.125, dtype=torch.float64))


@pytest.mark.parametrize("length_normalization", ["sum", "mean"])
def test_grpo_is_ppo_clip_plus_k3_kl(length_normalization):
    generator = torch.Generator().manual_seed(3)
    logprobs, old_logprobs, ref_logprobs = (
        -torch.rand(4, 5, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    mask = torch.rand(4, 5, generator=generator) > 0.3
    advantages = torch.randn(4, generator=generator, dtype=torch.float64)
    inputs = (logprobs, old_logprobs, ref_logprobs, mask, advantages)
    ppo = ppo_clip_loss(logprobs, old_logprobs, mask, advantages, length_normalization=length_normalization)
    grpo_without_kl = grpo_loss(*inputs, length_normalization=length_normalization)
    torch.testing.assert_close(grpo_without_kl.per_sample_loss, ppo.per_sample_loss, atol=0, rtol=0)
    torch.testing.assert_close(grpo_without_kl.loss, ppo.loss, atol=0, rtol=0)

    grpo = grpo_loss(*inputs, kl_coef=0.5, length_normalization=length_normalization)
    difference = ref_logprobs - logprobs
    token_kl = (difference.exp() - difference - 1) * mask
    per_sample_kl = token_kl.sum(dim=-1)
    if length_normalization == "mean":
        per_sample_kl = per_sample_kl / mask.sum(dim=-1).clamp(min=1)
    torch.testing.assert_close(grpo.per_sample_loss, ppo.per_sample_loss + 0.5 * per_sample_kl)
    assert grpo.metrics["kl_mean"] > 0


def test_k3_kl_is_zero_at_reference():
    logprobs = -torch.rand(3, 4, dtype=torch.float64)
    output = grpo_loss(logprobs, logprobs, logprobs.clone(), torch.ones(3, 4), torch.ones(3), kl_coef=1.0)
    assert output.metrics["kl_mean"] == 0


def test_group_mean_baseline_sums_to_zero_per_group():
    generator = torch.Generator().manual_seed(4)
    rewards = torch.rand(12, generator=generator, dtype=torch.float64)
    group_ids = torch.tensor([9, 2, 2, 5, 9, 5, 5, 2, 9, 9, 0, 0])
    advantages = group_mean_baseline(rewards, group_ids)
    for group in group_ids.unique():
        members = group_ids == group
        torch.testing.assert_close(advantages[members].sum(), torch.tensor(0.0, dtype=torch.float64))
        torch.testing.assert_close(advantages[members], rewards[members] - rewards[members].mean())


def test_group_normalized_advantages():
    group_ids = torch.tensor([4, 1, 4, 1, 4, 1, 6, 6])
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.7, 1.0, 0.2, 0.5, 0.5])
    advantages = group_normalized_advantages(rewards, group_ids)
    assert torch.all(advantages[group_ids == 6] == 0)
    for group in (1, 4):
        members = advantages[group_ids == group]
        torch.testing.assert_close(members.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(members.std(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_advantages_accept_binary_integer_rewards():
    advantages = group_mean_baseline(torch.tensor([1, 0, 0, 0]), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_rest_loss_fits_positive_samples_only_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.25, -4.0], [-3.0, -3.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    positive = torch.tensor([1.0, 0.0, 1.0])  # the second sample is wrong: never pushed down
    summed = rest_loss(logprobs, mask, positive, "sum")
    assert summed.per_sample_loss.tolist() == [3.0, 0.0, 3.0]  # -(−1 −2), 0, -(−3); masked tokens ignored
    assert summed.loss.item() == pytest.approx(2.0)
    summed.loss.backward()
    # d loss / d logprob = -1/b on trained tokens of positive samples, exactly 0 elsewhere.
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [0.0, 0.0, 0.0], [-1 / 3, 0.0, 0.0]])
    assert torch.allclose(logprobs.grad, expected) and (logprobs.grad[expected == 0] == 0).all()
    mean = rest_loss(logprobs.detach(), mask, positive, "mean")
    assert mean.per_sample_loss.tolist() == [1.5, 0.0, 3.0]
    assert mean.metrics["positive_fraction"].item() == pytest.approx(2 / 3)
