"""Sample n responses per prompt with an engine and score them: the input of shortest rejection sampling,
DPO pairs and the held-out evaluation (n = 1, greedy).

The engine session, generation settings and reward backends are data/difficulty.py's, so prompts are
formatted and scored exactly as in the RL run and in `megatron-rl data difficulty`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_rl.data.difficulty import EngineSession, GenerationSettings, sample_and_score
from megatron_rl.data.prompts import PromptRecord
from megatron_rl.reward.batch import RewardBackends


@dataclass(frozen=True)
class ScoredResponse:
    text: str
    tokens: int  # response tokens as generated (end-of-sequence included when the engine emitted it)
    correct: bool
    truncated: bool  # stopped by max_new_tokens


def sample_responses(session: EngineSession, records: Sequence[PromptRecord], n: int, settings: GenerationSettings,
                     backends: RewardBackends | None = None, reward_workers: int = 0) -> dict[str, list[ScoredResponse]]:
    """prompt id → its `n` scored responses in sample order, for every prompt whose requests all succeeded."""
    scored = sample_and_score(session, records, n, settings, backends, reward_workers)
    return {record_id: [ScoredResponse(sample.response_text, sample.response_length, score.correct,
                                       sample.finish_reason == "length") for sample, score in pairs]
            for record_id, pairs in scored.items()}


@dataclass(frozen=True)
class Evaluation:
    """Greedy answers to held-out prompts: what paper Fig. 7 plots (accuracy vs mean response tokens)."""

    prompts: int
    accuracy: float
    mean_response_tokens: float
    truncated_fraction: float


def evaluate(session: EngineSession, records: Sequence[PromptRecord], settings: GenerationSettings,
             backends: RewardBackends | None = None, reward_workers: int = 0) -> Evaluation:
    answered = [responses[0] for responses in sample_responses(session, records, 1, settings, backends,
                                                                reward_workers).values()]
    count = max(len(answered), 1)
    return Evaluation(prompts=len(answered), accuracy=sum(r.correct for r in answered) / count,
                      mean_response_tokens=sum(r.tokens for r in answered) / count,
                      truncated_fraction=sum(r.truncated for r in answered) / count)
