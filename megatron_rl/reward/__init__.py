"""Rewards for finished samples: rule-based maths checking, repetition detection, batch scoring."""

from megatron_rl.reward.batch import RewardRequest, RewardResult, score_batch
from megatron_rl.reward.math import answers_equivalent, extract_final_answer, math_reward
from megatron_rl.reward.repetition import RepetitionConfig, RepetitionDetector

__all__ = [
    "RepetitionConfig",
    "RepetitionDetector",
    "RewardRequest",
    "RewardResult",
    "answers_equivalent",
    "extract_final_answer",
    "math_reward",
    "score_batch",
]
