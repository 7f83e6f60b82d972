"""The `answer` of a prompt of type "code": its test cases, as one JSON object (a string in the JSONL file).

    {"language": "python",                       optional: python (default) or cpp
     "timeout_s": 5, "memory_mb": 256,           optional per-test limits (defaults: reward.code.Limits)
     "tests": [                                  at least one:
        {"stdin": "1 2\\n", "expected_stdout": "3\\n"},                     a stdin/stdout test
        {"function": "add", "args": [1, 2], "kwargs": {}, "expected": 3}   a function-call test (python)
     ]}

Example JSONL line:
    {"id": "add", "type": "code", "prompt": "Read a and b, print a+b.",
     "answer": "{\\"tests\\": [{\\"stdin\\": \\"1 2\\", \\"expected_stdout\\": \\"3\\"}]}"}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from megatron_rl.reward.code import FunctionCallTest, Limits, StdioTest, TestCase
from megatron_rl.reward.sandbox.protocol import Language


class StdioCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stdin: str = ""
    expected_stdout: str


class FunctionCallCase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: str = Field(min_length=1)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    expected: Any  # required; null is a valid expected value


class CodeAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    language: Language = "python"
    timeout_s: float | None = Field(None, gt=0.0)
    memory_mb: int | None = Field(None, ge=16)
    tests: list[StdioCase | FunctionCallCase] = Field(min_length=1)


@dataclass(frozen=True)
class CodeProblem:
    language: Language
    limits: Limits
    tests: tuple[TestCase, ...]


def parse_code_answer(answer: str) -> CodeProblem:
    """The problem a code prompt's `answer` describes; ValueError naming the field and the format otherwise."""
    try:
        parsed = CodeAnswer.model_validate_json(answer)
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "answer"
        raise ValueError(f"code answer: {where}: {problem['msg']}; the answer of a code prompt is a JSON object "
                         '{"tests": [{"stdin": ..., "expected_stdout": ...} or {"function": ..., "args": [...], '
                         '"expected": ...}]} (see megatron_rl/reward/code_tests.py)') from None
    defaults = Limits()
    limits = Limits(timeout_s=parsed.timeout_s or defaults.timeout_s, memory_mb=parsed.memory_mb or defaults.memory_mb)
    tests: list[TestCase] = []
    for case in parsed.tests:
        if isinstance(case, StdioCase):
            tests.append(StdioTest(case.stdin, case.expected_stdout))
        else:
            if parsed.language != "python":
                raise ValueError("code answer: function-call tests need \"language\": \"python\"")
            tests.append(FunctionCallTest(case.function, tuple(case.args), dict(case.kwargs), case.expected))
    return CodeProblem(parsed.language, limits, tuple(tests))
