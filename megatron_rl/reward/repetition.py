"""Degenerate-repetition detection on generated token ids (paper §2.3.5: repeat detection with penalty).

A sample is degenerate when its tail is one n-gram repeated over and over: the model is stuck in
a loop and will not produce an answer. The rollout calls `is_degenerate` after each generated
token, stops such a sample early (saving its remaining token budget) and gives it
`RepetitionConfig.penalty` as its reward.
"""
from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Candidates are first checked on this many final tokens, so a long check runs only for likely loops.
_QUICK_CHECK_TOKENS = 16


class RepetitionConfig(BaseModel):
    """When a tail counts as degenerate: for some n in [min_ngram, max_ngram], the last
    max(n * min_repeats, min_repeated_tokens) tokens repeat with period n.

    Defaults: a loop of up to 256 tokens (a paragraph) repeated 4 times, and never less than 128
    tokens in all, so a legitimately repeated short token ("0" in "1000000", spaces of an
    indentation, a markdown rule) is not mistaken for a loop.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="check rollouts for degenerate repetition")
    min_ngram: int = Field(1, ge=1, description="shortest repeated unit, in tokens")
    max_ngram: int = Field(256, ge=1, description="longest repeated unit, in tokens; bounds the per-call cost")
    min_repeats: int = Field(4, ge=2, description="copies of the unit the tail must hold")
    min_repeated_tokens: int = Field(128, ge=1, description="tokens the repetition must cover, whatever the unit")
    penalty: float = Field(-1.0, le=0.0, description="reward given to a degenerate sample")

    @model_validator(mode="after")
    def _ngram_range_is_ordered(self) -> RepetitionConfig:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must be ≤ max_ngram ({self.max_ngram})")
        return self


class RepetitionDetector:
    """Stateless check of a sequence's tail; cheap enough to call after every generated token.

    Only the last max(max_ngram * min_repeats, min_repeated_tokens) tokens are read, so the cost
    does not grow with the sequence length. Candidate periods are the distances back to earlier
    occurrences of the last token, so on ordinary text only a few periods are examined.
    """

    def __init__(self, config: RepetitionConfig | None = None) -> None:
        self.config = config or RepetitionConfig()
        self._tail_length = max(self.config.max_ngram * self.config.min_repeats, self.config.min_repeated_tokens)

    def is_degenerate(self, token_ids: Sequence[int]) -> bool:
        """Whether the tail of `token_ids` (a list or tuple) is one n-gram repeated; see RepetitionConfig."""
        tail = list(token_ids[-self._tail_length :])
        if not tail:
            return False
        last_index = len(tail) - 1
        # A period n needs tail[last_index - n] == the last token: list those tokens for
        # n = min_ngram, min_ngram + 1, ... so that list.index finds candidates at C speed.
        earlier = tail[max(last_index - self.config.max_ngram, 0) : max(last_index - self.config.min_ngram + 1, 0)]
        earlier.reverse()
        offset = 0
        while True:
            try:
                offset = earlier.index(tail[last_index], offset)
            except ValueError:
                return False
            if self._has_period(tail, self.config.min_ngram + offset):
                return True
            offset += 1

    def _has_period(self, tail: list[int], period: int) -> bool:
        span = max(period * self.config.min_repeats, self.config.min_repeated_tokens)
        if span > len(tail):
            return False
        compared = span - period  # tokens that must equal the token one period earlier
        quick = min(compared, _QUICK_CHECK_TOKENS)
        if tail[len(tail) - quick :] != tail[len(tail) - quick - period : len(tail) - period]:
            return False
        return tail[len(tail) - compared :] == tail[len(tail) - span : len(tail) - period]

