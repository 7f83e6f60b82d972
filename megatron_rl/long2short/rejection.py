"""Shortest rejection sampling (k1.5 §2.4): of n sampled responses per prompt, keep the shortest correct one
as SFT data. Prompts with no correct response give none."""
from __future__ import annotations

from collections.abc import Sequence

from megatron_rl.data.prompts import PromptRecord
from megatron_rl.data.sft_data import SFTRecord
from megatron_rl.long2short.sampling import ScoredResponse


def shortest_correct(responses: Sequence[ScoredResponse]) -> ScoredResponse | None:
    """The correct response with the fewest tokens (the earliest sampled among equals), or None.
    Correct is what the run's reward says (a response cut off by the length bound included, as in RL)."""
    correct = [response for response in responses if response.correct]
    return min(correct, key=lambda response: response.tokens) if correct else None


def shortest_rejection_records(records: Sequence[PromptRecord],
                               responses: dict[str, list[ScoredResponse]]) -> list[SFTRecord]:
    """One SFT record per prompt that has a correct response, in `records`' order."""
    kept = []
    for record in records:
        best = shortest_correct(responses.get(record.id, []))
        if best is not None:
            kept.append(SFTRecord(**record.model_dump(exclude_none=True), response=best.text))
    return kept
