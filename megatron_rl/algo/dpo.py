"""Direct Preference Optimization (Rafailov et al. 2023), k1.5's long2short DPO (paper §2.4).

Inputs are sequence log-probs: for each pair, the sum of the response tokens' log-probs of the chosen
and the rejected response, under the policy being trained and under the frozen reference policy (the
model DPO starts from). Shapes: [p] for p pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_rl.algo.losses import LossOutput


def sequence_logprobs(logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of the masked token log-probs of each sequence: [b, s] → [b]; masked positions count 0 even if inf."""
    return torch.where(loss_mask.bool(), logprobs, torch.zeros_like(logprobs)).sum(dim=-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor,
             beta: float, sft_weight: float = 0.0, chosen_tokens: Tensor | None = None) -> LossOutput:
    """loss_p = −log σ(β · ((π_c − ref_c) − (π_r − ref_r))) − sft_weight · π_c / chosen_tokens_p, per pair p.

    β·(π − ref) is DPO's implicit reward of a response; the loss pushes the chosen one's above the
    rejected one's. DPO alone may lower both responses' likelihood (only their difference matters), which
    on reasoning tasks loses accuracy; `sft_weight` > 0 adds the chosen response's per-token negative
    log-likelihood (as in Pang et al. 2024, iterative reasoning preference optimisation). Metrics: the mean
    implicit rewards, their margin, and the fraction of pairs whose chosen response already has the larger reward.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if sft_weight < 0 or (sft_weight > 0 and chosen_tokens is None):
        raise ValueError("sft_weight must be ≥ 0, and > 0 needs chosen_tokens (the chosen responses' token counts)")
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    per_pair_loss = -F.logsigmoid(margin)
    metrics = {}
    if sft_weight > 0:
        chosen_nll = -policy_chosen / chosen_tokens.clamp(min=1)
        per_pair_loss = per_pair_loss + sft_weight * chosen_nll
        metrics["chosen_nll_mean"] = chosen_nll.detach().mean()
    metrics |= {
        "chosen_reward_mean": chosen_reward.detach().mean(),
        "rejected_reward_mean": rejected_reward.detach().mean(),
        "reward_margin_mean": margin.detach().mean(),
        "preference_accuracy": (margin.detach() > 0).float().mean(),
    }
    return LossOutput(loss=per_pair_loss.mean(), per_sample_loss=per_pair_loss, metrics=metrics)
