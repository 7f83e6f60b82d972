"""Synthetic arithmetic prompts and the `data make-arithmetic` command."""
import argparse
import re

import pytest

from megatron_rl.data import generate_arithmetic_prompts, load_prompts
from megatron_rl.data.commands import register
from megatron_rl.errors import UserError

_QUESTION = re.compile(r"^What is ([-+* 0-9]+)\? Put the final answer in \\boxed\{\}\.$")


def _expression(prompt: str) -> str:
    match = _QUESTION.match(prompt)
    assert match, prompt
    return match.group(1)


def test_same_seed_same_prompts_other_seed_other_prompts():
    first = generate_arithmetic_prompts(20, seed=3)
    assert generate_arithmetic_prompts(20, seed=3) == first
    assert [record.prompt for record in generate_arithmetic_prompts(20, seed=4)] != [record.prompt for record in first]


def test_answers_follow_precedence_and_ids_and_problems_are_unique():
    records = generate_arithmetic_prompts(300, seed=0, max_operand=20, operand_count=4)
    for record in records:
        expression = _expression(record.prompt)
        assert len(expression.split()) == 7  # 4 operands, 3 operators
        assert record.answer == str(eval(expression))  # the test's independent check  # noqa: S307
    assert len({record.id for record in records}) == 300
    assert len({record.prompt for record in records}) == 300


def test_operations_and_max_operand_are_respected():
    for record in generate_arithmetic_prompts(50, seed=1, max_operand=9, operations=("+",)):
        left, operator, right = _expression(record.prompt).split()
        assert operator == "+" and 1 <= int(left) <= 9 and 1 <= int(right) <= 9


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ({"count": 0}, "count must be ≥ 1"),
        ({"count": 5, "max_operand": 2, "operations": ("+",)}, "exceeds the 4 distinct problems"),
        ({"count": 5, "operations": ("/",)}, "unsupported: /"),
        ({"count": 5, "operand_count": 1}, "operand_count must be ≥ 2"),
    ],
)
def test_bad_arguments_raise_user_errors(arguments, fragment):
    with pytest.raises(UserError, match=re.escape(fragment)):
        generate_arithmetic_prompts(seed=0, **arguments)


def test_make_arithmetic_command_writes_a_loadable_file(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "arithmetic.jsonl"
    args = parser.parse_args(
        ["data", "make-arithmetic", "--out", str(out), "--count", "12", "--seed", "5"]
        + ["--max-operand", "50", "--operations", "+-"]
    )
    assert args.handler(args) == 0
    records = load_prompts(out)
    assert records == generate_arithmetic_prompts(12, seed=5, max_operand=50, operations=("+", "-"))
    assert f"wrote 12 arithmetic prompts to {out}" in capsys.readouterr().out
