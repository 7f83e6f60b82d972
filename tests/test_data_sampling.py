"""Prompt sampling, synthetic train/eval sets, and prompt encoding."""
import logging

import pytest

from megatron_rl.builtin_models import tiny_digits_tokenizer
from megatron_rl.config import SyntheticDataConfig
from megatron_rl.data.formatting import encode_prompts
from megatron_rl.data.prompts import ChatMessage, PromptRecord
from megatron_rl.data.sampler import PromptSampler
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
