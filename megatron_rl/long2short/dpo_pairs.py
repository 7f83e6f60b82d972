"""DPO preference pairs for long2short (k1.5 §2.4).

Chosen: the shortest correct response of a prompt's samples. Rejected: every wrong response longer than it,
and every correct response at least `length_ratio` (the paper: 1.5) times as long. Each distinct rejected
text makes one pair with the chosen response; prompts with no correct response give none.
"""
from __future__ import annotations

from collections.abc import Sequence

from megatron_rl.data.prompts import PromptRecord
from megatron_rl.data.sft_data import PreferencePair
from megatron_rl.long2short.rejection import shortest_correct
from megatron_rl.long2short.sampling import ScoredResponse

DEFAULT_LENGTH_RATIO = 1.5


def rejected_responses(responses: Sequence[ScoredResponse], chosen: ScoredResponse,
                       length_ratio: float = DEFAULT_LENGTH_RATIO) -> list[ScoredResponse]:
    """The responses dispreferred to `chosen`, distinct by text, in sample order."""
    if length_ratio < 1:
        raise ValueError(f"length_ratio must be ≥ 1, got {length_ratio}")
    rejected, seen = [], {chosen.text}
    for response in responses:
        longer_wrong = not response.correct and response.tokens > chosen.tokens
        much_longer_correct = response.correct and response.tokens >= length_ratio * chosen.tokens
        if (longer_wrong or much_longer_correct) and response.text not in seen:
            seen.add(response.text)
            rejected.append(response)
    return rejected


def preference_pairs(records: Sequence[PromptRecord], responses: dict[str, list[ScoredResponse]],
                     length_ratio: float = DEFAULT_LENGTH_RATIO) -> list[PreferencePair]:
    """Pairs of every prompt, in `records`' order; ids are "<prompt id>-<k>"."""
    pairs = []
    for record in records:
        sampled = responses.get(record.id, [])
        chosen = shortest_correct(sampled)
        if chosen is None:
            continue
        fields = record.model_dump(exclude_none=True, exclude={"id"})
        for number, rejected in enumerate(rejected_responses(sampled, chosen, length_ratio)):
            pairs.append(PreferencePair(id=f"{record.id}-{number}", **fields, chosen=chosen.text, rejected=rejected.text))
    return pairs
