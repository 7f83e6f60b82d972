"""`megatron-rl data difficulty` and `data filter-hackable` against a real embedded engine.

The model is builtin:tiny-digits (random weights, a character tokenizer, so its answers are digits). The
expected outcomes come from independent greedy generations: a prompt whose reference answer is what the
model answers greedily has pass rate 1, one whose answer it never writes has pass rate 0.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine_fixtures import REPO, EngineServer
from megatron_rl.cli import main
from megatron_rl.data.difficulty import (
    GUESS_INSTRUCTION, GenerationSettings, engine_session, estimate_difficulty, filter_hackable, guess_record,
)
from megatron_rl.data.formatting import encode_prompts
from megatron_rl.data.prompts import PromptRecord, load_prompts, write_prompts
from megatron_rl.hf_checkpoint import resolve_hf_dir
from megatron_rl.reward.math import extract_final_answer
from megatron_rl.rollout import EngineClient, GenerateRequest, SamplingParams

MODEL = "builtin:tiny-digits"
QUESTIONS = ["1 + 2 = ?", "7 * 3 = ?", "40 - 2 = ?", "9 9 9 = ?", "3 + 3 = ?", "12 * 12 = ?"]
NEVER_WRITTEN = "-123456789.5"  # the model writes no '.': nothing it says equals this
SHORT_INSTRUCTION = "="  # the default instruction is all unknown characters to tiny-digits, and slow to prefill


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """tiny-digits in deterministic mode, so a greedy answer does not depend on what it is batched with."""
    with EngineServer(resolve_hf_dir(MODEL), tmp_path_factory.mktemp("engine") / "server.log",
                      "--enable-deterministic-inference", "--max-running-requests", "8") as server:
        yield server


@pytest.fixture(scope="module")
def session(engine):
    with engine_session(engine_url=engine.url) as session:  # tokenizer: the path the engine reports
        yield session


def greedy_answers(session, records: list[PromptRecord], max_new_tokens: int) -> list[str | None]:
    """The final answer of each record's greedy response, from a direct engine call."""
    encoded = encode_prompts(records, session.tokenizer, True, 10_000, "test")
    requests = [GenerateRequest(input_ids=prompt.input_ids, return_logprob=False,
                                sampling_params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
                for prompt in encoded]
    results = EngineClient(session.engine.base_url, timeout=60).generate(requests)
    return [extract_final_answer(session.tokenizer.decode(result.output_ids, skip_special_tokens=True))
            for result in results]


def answerable(session, make_record, max_new_tokens: int) -> tuple[PromptRecord, PromptRecord]:
    """(a record whose answer is the model's greedy answer, a record whose answer the model never gives)."""
    records = [make_record(PromptRecord(id=f"q{i}", prompt=q, answer="0")) for i, q in enumerate(QUESTIONS)]
    answers = greedy_answers(session, records, max_new_tokens)
    found = [(question, answer) for question, answer in zip(QUESTIONS, answers) if answer is not None]
    assert found, f"the model's greedy answers contain no number: {answers}"
    question, answer = found[0]
    other = next(q for q in QUESTIONS if q != question)
    return (PromptRecord(id="solved", prompt=question, answer=answer),
            PromptRecord(id="unsolved", prompt=other, answer=NEVER_WRITTEN, difficulty=0.5))


def test_difficulty_is_the_pass_rate(session):
    solved, unsolved = answerable(session, lambda record: record, max_new_tokens=6)
    greedy = GenerationSettings(max_new_tokens=6, temperature=0.0)
    result = estimate_difficulty(session, [solved, unsolved], samples=4, settings=greedy)
    assert [r.id for r in result.records] == ["solved", "unsolved"]
    assert [r.difficulty for r in result.records] == [1.0, 0.0]
    assert result.estimated == 2 and result.unestimated == []
    # Sampled: the pass rate is a multiple of 1/samples, and the same seed gives the same estimate.
    sampled = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=5)
    records = [PromptRecord(id=f"q{i}", prompt=q, answer=str(i)) for i, q in enumerate(QUESTIONS[:3])]
    first = estimate_difficulty(session, records, samples=4, settings=sampled)
    assert all(r.difficulty in (0.0, 0.25, 0.5, 0.75, 1.0) for r in first.records)
    again = estimate_difficulty(session, records, samples=4, settings=sampled)
    assert [r.difficulty for r in again.records] == [r.difficulty for r in first.records]


def test_filter_drops_prompts_answered_by_a_guess(session):
    solved, unsolved = answerable(session, lambda record: guess_record(record, SHORT_INSTRUCTION), max_new_tokens=3)
    kept_alone = PromptRecord(id="kept", prompt="5 5 = ?", answer=NEVER_WRITTEN)
    result = filter_hackable(session, [solved, unsolved, kept_alone], guesses=3,
                             settings=GenerationSettings(max_new_tokens=3, temperature=0.0),
                             instruction=SHORT_INSTRUCTION)
    assert [r.id for r in result.records] == ["unsolved", "kept"]
    assert [r.id for r in result.dropped] == ["solved"]
    assert result.records[0] == unsolved  # kept prompts are written as they were (no instruction, same fields)


def test_guess_record_asks_for_a_bare_answer_in_either_question_form():
    asked = guess_record(PromptRecord(id="a", prompt="What is 2 + 3?", answer="5"))
    assert asked.prompt == f"What is 2 + 3?\n\n{GUESS_INSTRUCTION}"
    chat = guess_record(PromptRecord(id="b", answer="5", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]))
    assert [m.content for m in chat.messages] == ["Be brief.", f"What is 2 + 3?\n\n{GUESS_INSTRUCTION}"]


def test_cli_estimates_with_its_own_embedded_engine_and_keeps_the_input(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [PromptRecord(id=f"q{i}", prompt=q, answer=str(i)) for i, q in enumerate(QUESTIONS[:3])])
    before = prompts.read_bytes()
    out = tmp_path / "with-difficulty.jsonl"
    process = subprocess.run(
        [sys.executable, "-m", "megatron_rl.cli", "data", "difficulty", "--prompts", str(prompts), "--out", str(out),
         "--model", MODEL, "--samples", "3", "--max-new-tokens", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "3 estimated" in process.stdout and "difficulty = pass rate" in process.stdout
    assert prompts.read_bytes() == before
    written = load_prompts(out)
    assert [r.id for r in written] == ["q0", "q1", "q2"]
    assert all(r.difficulty in (0.0, 1 / 3, 2 / 3, 1.0) for r in written)


def test_cli_refuses_to_overwrite_the_input_and_names_bad_lines(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "1 + 1 = ?", "answer": "2"}\n{"id": "b", "prompt": "x"}\n')
    before = prompts.read_bytes()
    for action in (["difficulty", "--samples", "2"], ["filter-hackable", "--guesses", "2"]):
        code = main(["data", *action, "--prompts", str(prompts), "--out", str(prompts), "--engine-url",
                     "http://127.0.0.1:9"])
        error = capsys.readouterr().err
        assert code == 2 and "is the input file" in error and "--in-place" in error
    assert prompts.read_bytes() == before
    code = main(["data", "difficulty", "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"), "--samples", "2",
                 "--engine-url", "http://127.0.0.1:9"])
    assert code == 2 and f"{prompts}:2: missing field 'answer'" in capsys.readouterr().err
    code_prompt = tmp_path / "code.jsonl"
    code_prompt.write_text(json.dumps({"id": "c", "type": "code", "prompt": "print 1", "answer": "{}"}) + "\n")
    code = main(["data", "difficulty", "--prompts", str(code_prompt), "--out", str(tmp_path / "o.jsonl"),
                 "--engine-url", "http://127.0.0.1:9"])
    assert code == 2 and "'c' is a code prompt; pass --sandbox-url" in capsys.readouterr().err
    code = main(["data", "difficulty", "--prompts", str(code_prompt), "--out", str(tmp_path / "o.jsonl"),
                 "--engine-url", "http://127.0.0.1:9", "--sandbox-url", "http://127.0.0.1:9"])
    assert code == 2 and "prompt 'c': code answer: tests: Field required" in capsys.readouterr().err
    code = main(["data", "difficulty", "--prompts", str(prompts.with_name("missing.jsonl")), "--out",
                 str(tmp_path / "o.jsonl"), "--engine-url", "http://127.0.0.1:9"])
    assert code == 2 and "prompt file not found" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"id": "a", "prompt": "1 + 1 = ?", "answer": "2"}\n')
    code = main(["data", "filter-hackable", "--prompts", str(good), "--out", str(tmp_path / "o.jsonl"),
                 "--engine-url", "http://127.0.0.1:9"])
    assert code == 2 and "--engine-url: cannot reach engine at http://127.0.0.1:9" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
