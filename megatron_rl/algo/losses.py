"""Policy losses on per-token log-probs: k1.5 online mirror descent, PPO clip and GRPO.

Shapes: b samples, s tokens. Log-prob tensors are [b, s]; `loss_mask` is [b, s] (nonzero = token
is trained on); `advantages` is [b]. Every loss returns per-sample values and their mean over b.
"""

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

LengthNormalization = Literal["sum", "mean"]


@dataclass
class LossOutput:
    loss: Tensor
    per_sample_loss: Tensor
    metrics: dict[str, Tensor]


def _masked_difference(minuend: Tensor, subtrahend: Tensor, mask: Tensor) -> Tensor:
    """minuend - subtrahend on trained tokens, exactly 0 elsewhere.

    Masking before any exp/square keeps garbage in padding (even inf) from turning into NaN
    values or gradients, and gives masked tokens an exactly zero gradient.
    """
    return torch.where(mask, minuend - subtrahend, torch.zeros_like(minuend))


def _token_counts(mask: Tensor) -> Tensor:
    # Clamped so an all-masked sample divides 0 by 1 instead of 0 by 0.
    return mask.sum(dim=-1).clamp(min=1)


def _masked_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over all trained tokens of the batch (0 if there are none), for metrics."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _check_length_normalization(length_normalization: str) -> None:
    if length_normalization not in ("sum", "mean"):
        raise ValueError(f"length_normalization must be 'sum' or 'mean', got {length_normalization!r}")


def _aggregate_tokens(token_loss: Tensor, mask: Tensor, length_normalization: LengthNormalization) -> Tensor:
    """Per-sample loss: sum of the masked token losses, or their mean under "mean"."""
    _check_length_normalization(length_normalization)
    per_sample = torch.where(mask, token_loss, torch.zeros_like(token_loss)).sum(dim=-1)
    return per_sample / _token_counts(mask) if length_normalization == "mean" else per_sample


def k15_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    loss_mask: Tensor,
    advantages: Tensor,
    tau: float,
    length_normalization: LengthNormalization = "sum",
) -> LossOutput:
    """k1.5 online mirror descent squared loss (paper §2.3.2, Eq. 3).

    logratio_j = sum over j's masked tokens of (logprobs - ref_logprobs), the sequence-level
    log(pi_theta / pi_ref) under both normalizations.

    "sum": loss_j = 0.5 * tau * (A_j / tau - logratio_j)^2, whose gradient is minus the Eq. 3
    summand: -(A_j * grad log pi_j - (tau / 2) * grad logratio_j^2).

    "mean": the same squared loss divided by n_j, the sample's masked token count (>= 1). The
    log-ratio itself is NOT divided by n_j: each sample's Eq. 3 gradient is scaled by 1/n_j, but
    its regression target A_j / tau = logratio_j, and so the optimum, stays that of the paper.
    A sample with no masked tokens has loss 0.
    """
    _check_length_normalization(length_normalization)
    mask = loss_mask.bool()
    logratio = _masked_difference(logprobs, ref_logprobs, mask).sum(dim=-1)
    per_sample_loss = 0.5 * tau * (advantages / tau - logratio).square()
    # Without this a sample with no trained tokens would still add the constant A^2 / (2 tau).
    per_sample_loss = torch.where(mask.any(dim=-1), per_sample_loss, torch.zeros_like(per_sample_loss))
    if length_normalization == "mean":
        per_sample_loss = per_sample_loss / _token_counts(mask)
    metrics = {
        "logratio_mean": logratio.detach().mean(),
        "logratio_abs_max": logratio.detach().abs().max(),
        "advantage_mean": advantages.detach().mean(),
    }
    return LossOutput(loss=per_sample_loss.mean(), per_sample_loss=per_sample_loss, metrics=metrics)


def _clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    clip_eps: float,
    clip_eps_high: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped token loss [b, s] (meaningless on masked tokens) and its metrics."""
    ratio = torch.exp(_masked_difference(logprobs, old_logprobs, mask))
    token_advantages = advantages.unsqueeze(-1)
    upper = 1.0 + (clip_eps if clip_eps_high is None else clip_eps_high)
    unclipped_objective = ratio * token_advantages
    clipped_objective = ratio.clamp(1.0 - clip_eps, upper) * token_advantages
    token_loss = -torch.minimum(unclipped_objective, clipped_objective)
    # Clipping is active (zero gradient) only where the clipped objective is the smaller one,
    # i.e. the ratio left the band in the direction the advantage favours.
    clip_active = (clipped_objective < unclipped_objective) & mask
    metrics = {
        "clip_fraction": _masked_token_mean(clip_active.to(ratio.dtype), mask).detach(),
        "ratio_mean": _masked_token_mean(ratio, mask).detach(),
    }
    return token_loss, metrics


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    loss_mask: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    length_normalization: LengthNormalization = "mean",
) -> LossOutput:
    """PPO clipped surrogate: -min(ratio * A, clip(ratio, 1 - clip_eps, 1 + clip_eps_high) * A).

    ratio = exp(logprobs - old_logprobs) per token; clip_eps_high defaults to clip_eps (a
    larger one is DAPO's clip-higher). Token losses are summed or averaged per sample.
    """
    mask = loss_mask.bool()
    token_loss, metrics = _clipped_surrogate(logprobs, old_logprobs, mask, advantages, clip_eps, clip_eps_high)
    per_sample_loss = _aggregate_tokens(token_loss, mask, length_normalization)
    return LossOutput(loss=per_sample_loss.mean(), per_sample_loss=per_sample_loss, metrics=metrics)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor,
    loss_mask: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    length_normalization: LengthNormalization = "mean",
) -> LossOutput:
    """GRPO: the PPO clipped token loss plus kl_coef times the k3 estimate of KL(pi || pi_ref).

    k3 per token = exp(ref - logp) - (ref - logp) - 1: unbiased for the KL under samples from
    pi, and never negative.
    """
    mask = loss_mask.bool()
    token_loss, metrics = _clipped_surrogate(logprobs, old_logprobs, mask, advantages, clip_eps, None)
    ref_logratio = _masked_difference(ref_logprobs, logprobs, mask)
    token_kl = torch.exp(ref_logratio) - ref_logratio - 1.0
    per_sample_loss = _aggregate_tokens(token_loss + kl_coef * token_kl, mask, length_normalization)
    metrics["kl_mean"] = _masked_token_mean(token_kl, mask).detach()
    return LossOutput(loss=per_sample_loss.mean(), per_sample_loss=per_sample_loss, metrics=metrics)


def rest_loss(
    logprobs: Tensor,
    loss_mask: Tensor,
    positive: Tensor,
    length_normalization: LengthNormalization = "sum",
) -> LossOutput:
    """ReST-style baseline (paper §3.5, Fig. 10): maximum likelihood on the positive samples only.

    loss_j = -positive_j * sum of sample j's masked token log-probs (or their mean under "mean"), with
    positive_j = 1 for a sample worth imitating and 0 otherwise: good responses are fitted, wrong ones
    are never pushed down — the negative gradients k1.5's loss has and this baseline lacks.
    """
    mask = loss_mask.bool()
    per_sample_loss = -positive * _aggregate_tokens(logprobs, mask, length_normalization)
    metrics = {"positive_fraction": positive.detach().float().mean()}
    return LossOutput(loss=per_sample_loss.mean(), per_sample_loss=per_sample_loss, metrics=metrics)
