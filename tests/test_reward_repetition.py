"""Degenerate-repetition detection on token ids."""
import random

import pydantic
import pytest

from megatron_rl.reward import RepetitionConfig, RepetitionDetector


def _random_tokens(count: int, seed: int, vocabulary: int = 1000) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(vocabulary) for _ in range(count)]


def test_single_token_loop_needs_min_repeated_tokens():
    detector = RepetitionDetector()  # min_repeated_tokens = 128
    prefix = _random_tokens(50, seed=0)
    assert not detector.is_degenerate(prefix + [7] * 127)
    assert detector.is_degenerate(prefix + [7] * 128)


def test_tail_loop_of_a_phrase_is_detected_once_it_has_min_repeats_copies():
    detector = RepetitionDetector()
    prefix = _random_tokens(1000, seed=1)
    phrase = _random_tokens(40, seed=2)  # 4 copies = 160 tokens ≥ 128
    assert not detector.is_degenerate(prefix + phrase * 3)
    assert detector.is_degenerate(prefix + phrase * 4)
    assert detector.is_degenerate(prefix + phrase * 4 + phrase[:17])  # stopped in the middle of a copy


def test_only_the_tail_counts():
    detector = RepetitionDetector()
    looped_then_recovered = [5] * 5000 + _random_tokens(300, seed=3)
    assert not detector.is_degenerate(looped_then_recovered)


def test_units_longer_than_max_ngram_are_not_checked():
    loop = _random_tokens(300, seed=4) * 4
    assert not RepetitionDetector().is_degenerate(loop)  # max_ngram = 256
    assert RepetitionDetector(RepetitionConfig(max_ngram=300)).is_degenerate(loop)


def test_empty_short_and_long_natural_sequences_are_not_degenerate():
    detector = RepetitionDetector(RepetitionConfig(min_repeats=3, min_repeated_tokens=12))
    assert not detector.is_degenerate([])
    assert not detector.is_degenerate([1, 2, 1, 2])
    # Called after every token of a 32k-token sample, as the rollout does; a small vocabulary
    # gives many candidate periods per call.
    generated: list[int] = []
    for token in _random_tokens(32768, seed=5, vocabulary=64):
        generated.append(token)
        assert not detector.is_degenerate(generated)


def test_config_defaults_and_validation():
    config = RepetitionConfig()
    assert (config.min_ngram, config.max_ngram, config.min_repeats, config.min_repeated_tokens) == (1, 256, 4, 128)
    assert config.penalty == -1.0
    with pytest.raises(pydantic.ValidationError, match="min_ngram"):
        RepetitionConfig(min_ngram=10, max_ngram=5)
    with pytest.raises(pydantic.ValidationError):
        RepetitionConfig(window=10)  # unknown keys are rejected
