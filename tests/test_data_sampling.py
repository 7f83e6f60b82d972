"""Prompt sampling (uniform, curriculum, prioritized), synthetic train/eval sets, and prompt encoding."""
import json
import logging
import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from megatron_rl.builtin_models import tiny_digits_tokenizer
from megatron_rl.config import SyntheticDataConfig
from megatron_rl.data.formatting import encode_prompts
from megatron_rl.data.prompts import ChatMessage, PromptRecord
from megatron_rl.data.sampler import (
    CurriculumConfig, CurriculumSampler, PrioritizedConfig, PrioritizedSampler, PromptSampler, SamplingConfig,
    make_sampler,
)
from megatron_rl.data.synthetic import generate_echo_prompts, synthetic_prompt_sets
from megatron_rl.errors import UserError


def test_each_epoch_visits_every_prompt_once_in_a_new_order():
    sampler = PromptSampler(10, seed=3)
    draws = sampler.next_indices(4) + sampler.next_indices(4) + sampler.next_indices(4)  # crosses an epoch
    first_epoch, second_epoch_start = draws[:10], draws[10:]
    assert sorted(first_epoch) == list(range(10))
    assert sampler.epoch == 1 and sampler.position == 2
    assert PromptSampler(10, seed=3)._epoch_order(1)[:2] == second_epoch_start
    assert PromptSampler(10, seed=3)._epoch_order(0) != PromptSampler(10, seed=3)._epoch_order(1)


def test_a_restored_sampler_continues_exactly_as_an_uninterrupted_one():
    straight = PromptSampler(7, seed=1)
    expected = [straight.next_indices(3) for _ in range(6)]
    interrupted = PromptSampler(7, seed=1)
    got = [interrupted.next_indices(3) for _ in range(2)]
    state = interrupted.state_dict()
    resumed = PromptSampler(7, seed=1)
    resumed.load_state_dict(state)
    got += [resumed.next_indices(3) for _ in range(4)]
    assert got == expected
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(7, seed=2).load_state_dict(state)


def test_synthetic_sets_are_deterministic_and_train_and_eval_are_disjoint():
    config = SyntheticDataConfig(task="arithmetic", train_count=50, eval_count=20, seed=5, max_operand=9)
    train, held_out = synthetic_prompt_sets(config)
    again_train, again_held_out = synthetic_prompt_sets(config)
    assert (len(train), len(held_out)) == (50, 20)
    assert [r.prompt for r in train] == [r.prompt for r in again_train]
    assert {r.prompt for r in train}.isdisjoint(r.prompt for r in held_out)


def test_echo_answers_are_the_last_digit():
    records = generate_echo_prompts(30, seed=2, digits=4)
    assert len({r.prompt for r in records}) == 30
    for record in records:
        digits = record.prompt.split(" ")
        assert len(digits) == 4 and all(d.isdigit() for d in digits)
        assert record.answer == digits[-1]
    with pytest.raises(UserError, match="distinct echo prompts"):
        generate_echo_prompts(11, seed=0, digits=1)


def test_encoding_uses_the_text_without_a_chat_template_and_drops_prompts_that_cannot_fit(caplog):
    tokenizer = tiny_digits_tokenizer()
    records = [PromptRecord(id="short", prompt="1 2", answer="2"), PromptRecord(id="long", prompt="1 2 3 4", answer="4")]
    with caplog.at_level(logging.WARNING):
        encoded = encode_prompts(records, tokenizer, apply_chat_template=True, max_prompt_tokens=5, source="set.jsonl")
    assert [e.record.id for e in encoded] == ["short"]
    assert tokenizer.decode(encoded[0].input_ids) == "1 2"
    assert "1 prompt(s) longer than 5 tokens" in caplog.text and "'long'" in caplog.text
    with pytest.raises(UserError, match="no prompt fits in 2 tokens"):
        encode_prompts(records, tokenizer, True, max_prompt_tokens=2, source="set.jsonl")


def test_chat_messages_need_a_chat_template():
    record = PromptRecord(id="chat", messages=[ChatMessage(role="user", content="1 2")], answer="2")
    with pytest.raises(UserError, match="set.jsonl: prompt 'chat' is given as 'messages'.*no chat template"):
        encode_prompts([record], tiny_digits_tokenizer(), True, 10, "set.jsonl")


def test_chat_template_formats_prompts_and_messages_alike():
    tokenizer = tiny_digits_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}{% if add_generation_prompt %}?{% endif %}"
    records = [PromptRecord(id="text", prompt="1 2", answer="2"),
               PromptRecord(id="chat", messages=[ChatMessage(role="user", content="1 2")], answer="2")]
    encoded = encode_prompts(records, tokenizer, True, 10, "set.jsonl")
    assert [tokenizer.decode(e.input_ids) for e in encoded] == ["1 2=?", "1 2=?"]
    plain = encode_prompts(records[:1], tokenizer, False, 10, "set.jsonl")  # data.apply_chat_template=false
    assert tokenizer.decode(plain[0].input_ids) == "1 2"
    # data.system_prompt goes first into conversations without a system message of their own.
    system = encode_prompts(records + [PromptRecord(id="own", answer="2", messages=[
        ChatMessage(role="system", content="9"), ChatMessage(role="user", content="1 2")])], tokenizer, True, 10,
        "set.jsonl", system_prompt="0")
    assert [tokenizer.decode(e.input_ids) for e in system] == ["0=1 2=?", "0=1 2=?", "9=1 2=?"]


# ---------------------------------------------------------------------------------------------------
# Curriculum and prioritized sampling
# ---------------------------------------------------------------------------------------------------


def chi_square_critical(degrees_of_freedom: int, significance: float = 1e-3) -> float:
    """The chi-square quantile at 1 − significance: scipy's when installed, else the Wilson–Hilferty
    approximation (within 1% for 10+ degrees of freedom) at significance 1e-3 (z = 3.0902)."""
    try:
        from scipy.stats import chi2
    except ImportError:
        assert significance == 1e-3, "without scipy only significance 1e-3 is tabulated"
        k = degrees_of_freedom
        return k * (1 - 2 / (9 * k) + 3.0902 * math.sqrt(2 / (9 * k))) ** 3
    return float(chi2.ppf(1 - significance, degrees_of_freedom))


def chi_square(counts: list[int], probabilities: list[float]) -> float:
    total = sum(counts)
    return sum((count - total * p) ** 2 / (total * p) for count, p in zip(counts, probabilities))


def records(difficulties) -> list[PromptRecord]:
    return [PromptRecord(id=f"q{i}", prompt=f"{i}", answer="0", difficulty=d) for i, d in enumerate(difficulties)]


def data_config(**sampling) -> SimpleNamespace:
    """The fields of the `data` config section that make_sampler reads."""
    return SimpleNamespace(sampling=SamplingConfig(**sampling), seed=11, prompts_per_iteration=4)


def test_prioritized_frequencies_follow_one_minus_success_rate():
    success_rates = [0.0, 0.1, 0.25, 0.5, 0.5, 0.75, 0.9, 0.95, 1.0, 1.0, 0.3, 0.6]
    config = PrioritizedConfig(priority_floor=0.02)
    sampler = PrioritizedSampler(len(success_rates), seed=7, initial_success_rates=success_rates, config=config)
    weights = [max(1 - s, 0.02) for s in success_rates]
    probabilities = [w / sum(weights) for w in weights]
    draws = sampler.next_indices(500) + [i for _ in range(100) for i in sampler.next_indices(45)]  # 5000 in all
    counts = Counter(draws)
    observed = [counts[i] for i in range(len(success_rates))]
    statistic = chi_square(observed, probabilities)
    assert statistic < chi_square_critical(len(success_rates) - 1), (statistic, observed)
    # The test has power: the same draws are far from uniform.
    assert chi_square(observed, [1 / len(success_rates)] * len(success_rates)) > 10 * chi_square_critical(11)
    assert counts[8] > 0  # a solved prompt keeps the floor weight


def test_prioritized_success_rates_track_outcomes_and_shift_the_draws():
    sampler = PrioritizedSampler(2, seed=1, initial_success_rates=[0.5, 0.5], config=PrioritizedConfig(smoothing=0.5))
    sampler.record_outcomes(0, successes=8, samples=8)
    sampler.record_outcomes(0, successes=8, samples=8)
    sampler.record_outcomes(1, successes=0, samples=8)
    assert sampler.success_rates == [0.875, 0.25]
    counts = Counter(sampler.next_indices(2000))
    share = counts[0] / 2000  # expected 0.125 / (0.125 + 0.75) = 1/7
    assert abs(share - 1 / 7) < 4 * math.sqrt((1 / 7) * (6 / 7) / 2000)
    with pytest.raises(ValueError, match="successes"):
        sampler.record_outcomes(1, successes=9, samples=8)
    with pytest.raises(ValueError, match="prompt_index"):
        sampler.record_outcomes(2, successes=0, samples=8)


def test_curriculum_warms_up_then_draws_only_hard_prompts():
    difficulties = [0.9, 0.1, 0.8, 0.2, 0.6, 0.0, 1.0, 0.4]
    hard = {i for i, d in enumerate(difficulties) if d < 0.5}
    sampler = make_sampler(data_config(curriculum=CurriculumConfig(switch_iteration=3, hard_below=0.5,
                                                                   warmup="easy")), records(difficulties))
    assert isinstance(sampler, CurriculumSampler) and sampler.phase == "warmup"
    warmup = sampler.next_indices(10)  # 3 iterations × 4 prompts = 12 warm-up draws
    assert set(warmup) == set(range(8)) - hard
    straddling = sampler.next_indices(4)
    assert set(straddling[:2]) <= set(range(8)) - hard and set(straddling[2:]) <= hard
    assert sampler.phase == "hard"
    after = sampler.next_indices(6)
    assert sorted(straddling[2:] + after) == sorted(list(hard) * 2)  # two uniform epochs over the hard pool
    # The paper's ablation: warm up on every prompt.
    everything = make_sampler(data_config(curriculum=CurriculumConfig(switch_iteration=2)), records(difficulties))
    assert sorted(everything.next_indices(8)) == list(range(8))
    assert set(everything.next_indices(40)) == hard


def test_curriculum_needs_difficulties_and_both_pools():
    with pytest.raises(UserError, match="1 of 3 have none .*'q1'.*megatron-rl data difficulty"):
        make_sampler(data_config(curriculum=CurriculumConfig()), records([0.1, None, 0.9]))
    with pytest.raises(UserError, match="no hard prompts"):
        make_sampler(data_config(curriculum=CurriculumConfig(hard_below=0.1)), records([0.5, 0.9]))
    with pytest.raises(UserError, match="no easy prompts"):
        make_sampler(data_config(curriculum=CurriculumConfig(warmup="easy")), records([0.1, 0.2]))


def test_make_sampler_picks_the_configured_kind_and_prioritized_starts_from_difficulty():
    assert isinstance(make_sampler(data_config(), records([None, None])), PromptSampler)
    prioritized = make_sampler(data_config(prioritized=PrioritizedConfig(initial_success_rate=0.3)),
                               records([0.9, None]))
    assert isinstance(prioritized, PrioritizedSampler) and prioritized.success_rates == [0.9, 0.3]
    both = make_sampler(data_config(curriculum=CurriculumConfig(switch_iteration=0), prioritized=PrioritizedConfig()),
                        records([0.0, 0.45, 0.9, 0.95]))
    counts = Counter(both.next_indices(3000))
    assert set(counts) == {0, 1}  # prioritized inside the hard pool only
    assert abs(counts[0] / 3000 - 1 / 1.55) < 0.03  # weights 1.0 and 0.55


@pytest.mark.parametrize("sampling", [
    {},
    {"prioritized": PrioritizedConfig()},
    {"curriculum": CurriculumConfig(switch_iteration=2)},
    {"curriculum": CurriculumConfig(switch_iteration=2, warmup="easy"), "prioritized": PrioritizedConfig()},
])
def test_every_sampler_resumes_exactly_through_json(sampling):
    prompts = records([0.05 * i for i in range(20)])
    outcomes = random.Random(3)

    def run(sampler, iterations):
        drawn = []
        for _ in range(iterations):
            batch = sampler.next_indices(4)
            drawn.append(batch)
            for index in batch:
                sampler.record_outcomes(index, outcomes.randint(0, 8), 8)
        return drawn

    straight = make_sampler(data_config(**sampling), prompts)
    expected = run(straight, 9)
    outcomes.seed(3)
    interrupted = make_sampler(data_config(**sampling), prompts)
    got = run(interrupted, 4)
    state = json.loads(json.dumps(interrupted.state_dict()))  # as a checkpoint stores it
    resumed = make_sampler(data_config(**sampling), prompts)
    resumed.load_state_dict(state)
    got += run(resumed, 5)
    assert got == expected
    assert resumed.state_dict() == straight.state_dict()


def test_a_state_of_another_sampling_kind_is_refused():
    prompts = records([0.2, 0.8])
    uniform_state = make_sampler(data_config(), prompts).state_dict()
    with pytest.raises(ValueError, match="uniform sampling, not prioritized"):
        make_sampler(data_config(prioritized=PrioritizedConfig()), prompts).load_state_dict(uniform_state)
    curriculum_state = make_sampler(data_config(curriculum=CurriculumConfig()), prompts).state_dict()
    with pytest.raises(ValueError, match="curriculum sampling, not uniform"):
        PromptSampler(2, seed=11).load_state_dict(curriculum_state)
    with pytest.raises(ValueError, match="prioritized sampling inside the curriculum"):
        make_sampler(data_config(curriculum=CurriculumConfig(), prioritized=PrioritizedConfig()),
                     prompts).load_state_dict(curriculum_state)
