"""Synthetic prompt sets chosen by config (`data.synthetic`), split into disjoint train and eval parts.

Tasks:
- `arithmetic`: integer expressions for small instruct models (data/arithmetic.py).
- `echo`: a digit string such as "4 7 1" whose answer is its last digit ("1"). Meaningless to a
  language model but learnable from scratch by a tiny random one: the answer is the input token at
  the last prompt position, so RL only has to learn to copy it. Used by the tiny model's runs and tests.
"""
from __future__ import annotations

import random

from megatron_rl.config import SyntheticDataConfig
from megatron_rl.data.arithmetic import generate_arithmetic_prompts
from megatron_rl.data.prompts import PromptRecord
from megatron_rl.errors import UserError


def generate_echo_prompts(count: int, seed: int, digits: int = 3) -> list[PromptRecord]:
    """`count` distinct digit strings of `digits` digits; the answer of each is its last digit."""
    if count > 10**digits:
        raise UserError(f"count {count} exceeds the {10**digits} distinct echo prompts of {digits} digits; "
                        "raise data.synthetic.operand_count or ask for fewer")
    generator = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < count:
        text = " ".join(str(generator.randrange(10)) for _ in range(digits))
        if text in seen:
            continue
        seen.add(text)
        records.append(PromptRecord(id=f"echo-{seed}-{len(records)}", prompt=text, answer=text[-1]))
    return records


def synthetic_prompt_sets(config: SyntheticDataConfig) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, eval): one pool of distinct problems, so the held-out ones never appear in training."""
    total = config.train_count + config.eval_count
    if config.task == "echo":
        pool = generate_echo_prompts(total, config.seed, digits=config.operand_count)
    else:
        pool = generate_arithmetic_prompts(total, config.seed, max_operand=config.max_operand,
                                           operations=tuple(config.operations), operand_count=config.operand_count)
    return pool[: config.train_count], pool[config.train_count:]
