"""Synthetic integer-arithmetic prompts: a verifiable task for smoke runs and small models.

Difficulty is set by two knobs:
- `operand_count`: longer expressions, where with 3+ operands operator precedence matters
  ("2 + 3 * 4" is 14, not 20);
- `max_operand`: bigger numbers, so more digits, carries and longer products.
The defaults (2 operands up to 100) suit a small instruct model; 4 operands up to 1000 is hard
for one.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from megatron_rl.data.prompts import PromptRecord
from megatron_rl.errors import UserError

SUPPORTED_OPERATIONS = ("+", "-", "*")


def generate_arithmetic_prompts(
    count: int,
    seed: int,
    max_operand: int = 100,
    operations: Sequence[str] = SUPPORTED_OPERATIONS,
    operand_count: int = 2,
) -> list[PromptRecord]:
    """`count` distinct problems, the same for the same arguments; operands are drawn from [1, max_operand].

    Ids are "arithmetic-<seed>-<index>"; each answer is the integer value of the expression
    under the usual precedence (* before + and -).
    """
    _check_arguments(count, max_operand, operations, operand_count)
    distinct_problems = max_operand**operand_count * len(set(operations)) ** (operand_count - 1)
    if count > distinct_problems:
        raise UserError(
            f"count {count} exceeds the {distinct_problems} distinct problems of these settings; "
            "raise max_operand or operand_count, or ask for fewer"
        )
    generator = random.Random(seed)
    seen_expressions: set[str] = set()
    records: list[PromptRecord] = []
    while len(records) < count:
        operands = [generator.randint(1, max_operand) for _ in range(operand_count)]
        operators = [generator.choice(operations) for _ in range(operand_count - 1)]
        steps = [f" {operator} {operand}" for operator, operand in zip(operators, operands[1:])]
        expression = str(operands[0]) + "".join(steps)
        if expression in seen_expressions:
            continue
        seen_expressions.add(expression)
        records.append(
            PromptRecord(
                id=f"arithmetic-{seed}-{len(records)}",
                prompt=f"What is {expression}? Put the final answer in \\boxed{{}}.",
                answer=str(_evaluate(operands, operators)),
            )
        )
    return records


def _evaluate(operands: list[int], operators: list[str]) -> int:
    # Products bind first: fold each "*" into the current term, and start a new term at "+"/"-".
    terms = [operands[0]]
    signs = [1]
    for operator, operand in zip(operators, operands[1:]):
        if operator == "*":
            terms[-1] *= operand
        else:
            terms.append(operand)
            signs.append(1 if operator == "+" else -1)
    return sum(sign * term for sign, term in zip(signs, terms))


def _check_arguments(count: int, max_operand: int, operations: Sequence[str], operand_count: int) -> None:
    if count < 1:
        raise UserError(f"count must be ≥ 1 (got {count}); ask for at least one prompt")
    if max_operand < 1:
        raise UserError(f"max_operand must be ≥ 1 (got {max_operand}); operands are drawn from [1, max_operand]")
    if operand_count < 2:
        raise UserError(f"operand_count must be ≥ 2 (got {operand_count}); a problem needs at least one operation")
    unsupported = [operation for operation in operations if operation not in SUPPORTED_OPERATIONS]
    if unsupported or not operations:
        raise UserError(
            f"operations {list(operations)} must be a non-empty choice of {' '.join(SUPPORTED_OPERATIONS)}; "
            f"unsupported: {' '.join(unsupported) or 'none given'}"
        )
