"""Sample n responses per prompt with an engine and score them: the input of shortest rejection sampling,
DPO pairs and the held-out evaluation (n = 1, greedy).

The engine session, generation settings and reward backends are data/difficulty.py's, so prompts are
formatted and scored exactly as in the RL run and in `megatron-rl data difficulty`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_rl.data.difficulty import PROMPTS_PER_CHUNK, EngineSession, GenerationSettings
from megatron_rl.data.formatting import encode_prompts
from megatron_rl.data.prompts import PromptRecord
from megatron_rl.reward.batch import RewardBackends, RewardRequest, score_batch
from megatron_rl.rollout.generation import RolloutFailed, generate_samples

logger = logging.getLogger(__name__)

NO_PROMPT_BOUND = 1 << 30  # the engine itself refuses a prompt beyond its context (a failed group)


@dataclass(frozen=True)
class ScoredResponse:
    text: str
    tokens: int  # response tokens as generated (end-of-sequence included when the engine emitted it)
    correct: bool
    truncated: bool  # stopped by max_new_tokens


def sample_responses(session: EngineSession, records: Sequence[PromptRecord], n: int, settings: GenerationSettings,
                     backends: RewardBackends | None = None, reward_workers: int = 0) -> dict[str, list[ScoredResponse]]:
    """prompt id → its `n` scored responses in sample order, for every prompt whose requests all succeeded."""
    decode = lambda ids: session.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    weight_version = session.engine.weight_version() or "default"
    responses: dict[str, list[ScoredResponse]] = {}
    for chunk_number, start in enumerate(range(0, len(records), PROMPTS_PER_CHUNK)):
        chunk = list(records[start: start + PROMPTS_PER_CHUNK])
        prompts = encode_prompts(chunk, session.tokenizer, settings.apply_chat_template, NO_PROMPT_BOUND, "prompts",
                                 settings.system_prompt)
        try:
            rollout = generate_samples(session.engine, prompts, n, settings.sampling_params(), weight_version, decode,
                                       seed=settings.seed if settings.temperature > 0 else None,
                                       iteration=chunk_number, timeout=settings.request_timeout_s)
        except RolloutFailed as error:
            logger.warning("every request of prompts %d-%d failed: %s", start + 1, start + len(chunk), error)
            continue
        requests = [RewardRequest(sample_id=f"{sample.group_id}-{sample.sample_index}", response_text=sample.response_text,
                                  reference_answer=sample.prompt.record.answer, task_type=sample.prompt.record.type,
                                  question=sample.prompt.record.question_text())
                    for sample in rollout.samples]
        scores = score_batch(requests, workers=reward_workers, backends=backends)
        for sample, score in sorted(zip(rollout.samples, scores), key=lambda item: (item[0].group_id, item[0].sample_index)):
            responses.setdefault(sample.prompt.record.id, []).append(ScoredResponse(
                sample.response_text, sample.response_length, score.correct, sample.finish_reason == "length"))
    return responses


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
