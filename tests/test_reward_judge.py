"""The chain-of-thought judge: prompt building and strict verdict parsing on strings, then end to end
against the real embedded engine serving "phrase" models.

A phrase model is a real HF Llama whose tokens are whole phrases and whose weights make greedy decoding
follow a fixed chain (attention and MLP are zero, so each next token depends on the current one only, via
the LM head): after the prompt it writes a reasoning phrase, then a verdict phrase, then EOS. Which chain
it starts is set by its weights, and the engine switches between them with a real weight update; so every
judge outcome (true, false, malformed, truncated) comes from the real engine over HTTP, nothing scripted.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engine_fixtures import EngineServer
from megatron_rl.reward.batch import RewardBackends, RewardRequest, score_batch
from megatron_rl.reward.judge import (
    Judge, JudgeConfig, JudgeItem, MalformedVerdict, final_answer_part, judge_messages, parse_verdict,
)

# ---------------------------------------------------------------------------------------------------
# Strings
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, correct", [
    ('The forms are equal.\n{"correct": true}', True),
    ('Let {x} be the answer; {"a": 1} is not it.\n{"correct": false}\n', False),
    ('Reasoning {"correct": true} then revised:\n```json\n{"correct": false}\n```', False),
    ('{"correct":true}', True),
])
def test_the_verdict_is_the_json_object_that_ends_the_answer(text, correct):
    assert parse_verdict(text).correct is correct


@pytest.mark.parametrize("text, problem", [
    ("They match, so the answer is correct.", "does not end with a JSON verdict"),
    ('{"correct": true}\nI am confident.', "does not end with a JSON verdict"),
    ('Equal.\n{"correct": "true"}', "field 'correct': input should be a valid boolean"),
    ('Equal.\n{"correct": 1}', "field 'correct': input should be a valid boolean"),
    ('Equal.\n{"correct": true, "confidence": 0.9}', "field 'confidence': extra inputs are not permitted"),
    ('Equal.\n{"verdict": true}', "field 'correct': field required"),
    ('Equal.\n{"correct": true', "does not end with a JSON verdict"),
    ("Equal. correct: true}", "no JSON object ends there"),
    ("", "does not end with a JSON verdict"),
])
def test_anything_else_is_a_malformed_verdict(text, problem):
    with pytest.raises(MalformedVerdict, match=problem):
        parse_verdict(text)


def test_the_judge_sees_the_question_the_reference_and_only_the_final_answer():
    assert final_answer_part("<think>maybe 5? no</think>\nThe answer is 6.") == "The answer is 6."
    assert final_answer_part("No reasoning block: 6") == "No reasoning block: 6"
    system, user = judge_messages(JudgeItem("What is 2 * 3?", "6", "<think>maybe 5? no</think>\nThe answer is 6."))
    assert system["role"] == "system" and user["role"] == "user"
    content = user["content"]
    assert "What is 2 * 3?" in content and "Reference answer:\n6" in content and "The answer is 6." in content
    assert "maybe 5" not in content
    assert content.rstrip().endswith('{"correct": true} if the final answer is correct, {"correct": false} otherwise.')


# ---------------------------------------------------------------------------------------------------
# End to end: the embedded engine as the judge
# ---------------------------------------------------------------------------------------------------

PHRASES = ["<unk>", "<eos>", "The two forms are equal.", '\n{"correct": true}', "They differ.",
           '\n{"correct": false}', "Looks right to me.", "Hmm, let me check again."]
UNK, EOS, SAYS_EQUAL, VERDICT_TRUE, SAYS_DIFFER, VERDICT_FALSE, NO_VERDICT, LOOPS = range(len(PHRASES))
# phrase → the phrase after it; what follows the prompt (whose words are all <unk>) differs per model.
CHAIN = {SAYS_EQUAL: VERDICT_TRUE, VERDICT_TRUE: EOS, SAYS_DIFFER: VERDICT_FALSE, VERDICT_FALSE: EOS,
         NO_VERDICT: EOS, LOOPS: LOOPS, EOS: EOS}


def phrase_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({phrase: index for index, phrase in enumerate(PHRASES)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.Fuse()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>")
    wrapped.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return wrapped


def write_phrase_model(directory: Path, first_phrase: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    size = len(PHRASES)
    config = LlamaConfig(vocab_size=size, hidden_size=size, intermediate_size=size, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=EOS, pad_token_id=EOS)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    transitions = {**CHAIN, UNK: first_phrase}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
        model.model.embed_tokens.weight.copy_(torch.eye(size))  # the residual stream is the token's one-hot
        for token, following in transitions.items():
            model.lm_head.weight[following, token] = 5.0
    model.save_pretrained(directory, safe_serialization=True)
    phrase_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def phrase_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phrase-models")
    return {name: write_phrase_model(root / name, first) for name, first in
            [("true", SAYS_EQUAL), ("false", SAYS_DIFFER), ("no_verdict", NO_VERDICT), ("loops", LOOPS)]}


@pytest.fixture(scope="module")
def judge_engine(phrase_models, tmp_path_factory):
    with EngineServer(phrase_models["true"], tmp_path_factory.mktemp("judge") / "server.log",
                      "--max-running-requests", "4") as server:
        yield server


def serve(judge_engine, phrase_models, name: str) -> None:
    from megatron_rl.rollout import EngineClient

    result = EngineClient(judge_engine.url, timeout=60).update_weights_from_disk(str(phrase_models[name]), name)
    assert result.success, result.message


ITEMS = [JudgeItem("What is 2 * 3?", "6", "It is 6."), JudgeItem("Factor a^2 - 4.", "(a+2)(a-2)", "(a-2)(a+2)")]


def requests_for(items) -> list[RewardRequest]:
    return [RewardRequest(f"s{i}", item.response, item.reference_answer, "judge", question=item.question)
            for i, item in enumerate(items)]


def test_judge_verdicts_from_the_engine_become_rewards(judge_engine, phrase_models):
    judge = Judge.connect(JudgeConfig(engine_url=judge_engine.url, max_new_tokens=16))  # tokenizer: from /model_info
    assert judge.use_chat_template
    backends = RewardBackends(judge=judge)
    serve(judge_engine, phrase_models, "true")
    outcomes = judge.judge(ITEMS)
    assert [o.correct for o in outcomes] == [True, True]
    assert outcomes[0].judge_text == 'The two forms are equal.\n{"correct": true}'
    degenerate = RewardRequest("s9", "loop", "6", "judge", degenerate=True, question="q")
    results = score_batch([*requests_for(ITEMS), degenerate], workers=1, degenerate_penalty=-0.5, backends=backends)
    assert [(r.sample_id, r.reward, r.correct, r.reason) for r in results] == [
        ("s0", 1.0, True, "correct"), ("s1", 1.0, True, "correct"), ("s9", -0.5, False, "degenerate_repetition")]
    serve(judge_engine, phrase_models, "false")
    results = score_batch(requests_for(ITEMS), workers=1, backends=backends)
    assert [(r.reward, r.reason) for r in results] == [(0.0, "wrong_answer"), (0.0, "wrong_answer")]
    assert sum(judge.failures.values()) == 0


def test_answers_without_a_verdict_are_counted_failures_scored_zero(judge_engine, phrase_models, caplog):
    judge = Judge.connect(JudgeConfig(engine_url=judge_engine.url, max_new_tokens=8))
    backends = RewardBackends(judge=judge)
    serve(judge_engine, phrase_models, "no_verdict")
    with caplog.at_level(logging.WARNING, logger="megatron_rl.reward.judge"):
        results = score_batch(requests_for(ITEMS), workers=1, backends=backends)
    assert [r.reward for r in results] == [0.0, 0.0] and not any(r.correct for r in results)
    assert all(r.reason.startswith("malformed_verdict: the answer does not end with a JSON verdict") for r in results)
    assert judge.failures == {"malformed_verdict": 2}
    assert caplog.text.count("judge failure (malformed_verdict, scored 0)") == 2
    serve(judge_engine, phrase_models, "loops")
    outcomes = judge.judge(ITEMS[:1])
    assert outcomes[0].failure == "truncated" and "cut off at 8 tokens" in outcomes[0].reason
    assert judge.failures == {"malformed_verdict": 2, "truncated": 1}


def test_an_unreachable_judge_is_a_counted_failure_not_a_crash(judge_engine):
    judge = Judge.connect(JudgeConfig(engine_url=judge_engine.url))
    judge.engine.base_url = "http://127.0.0.1:9"  # the judge engine went away after the run started
    results = score_batch(requests_for(ITEMS), workers=1, backends=RewardBackends(judge=judge))
    assert [r.reward for r in results] == [0.0, 0.0]
    assert all(r.reason.startswith("engine_error: judge engine: cannot reach engine") for r in results)
    assert judge.failures == {"engine_error": 2}
