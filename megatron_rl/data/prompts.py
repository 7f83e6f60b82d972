"""The prompt-set file: JSONL, one prompt record per line.

Each line is a JSON object with these fields (blank lines are skipped):

    id          string, unique in the file (a number is accepted and read as a string)
    prompt      string: the question, sent as one user message      } exactly one
    messages    list of {"role": system|user|assistant, "content": str},
                ending with a user message                          } of these two
    answer      string: the reference answer (a number is accepted and read as a string)
    type        "math", "code" (answer: JSON tests, see reward/code_tests.py) or "judge" (graded by
                reward.judge) (default "math")
    difficulty  optional number in [0, 1]: the problem's pass rate (paper §2.3.4)

Example:  {"id": "gsm8k-17", "prompt": "What is 2 + 3?", "answer": "5", "difficulty": 0.9}
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_validator

from megatron_rl.atomic_file import atomic_text_file
from megatron_rl.errors import UserError

_EXAMPLE = '{"id": "q1", "prompt": "What is 2 + 3?", "answer": "5"}'


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class PromptRecord(BaseModel):
    """One prompt with its reference answer; see the module docstring for the file format."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, coerce_numbers_to_str=True)
    prompt: str | None = Field(None, min_length=1)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    answer: str = Field(coerce_numbers_to_str=True)
    type: Literal["math", "code", "judge"] = "math"
    difficulty: float | None = Field(None, ge=0.0, le=1.0, description="pass rate of the problem")

    @model_validator(mode="after")
    def _one_question_form(self) -> PromptRecord:
        if (self.prompt is None) == (self.messages is None):
            given = "neither 'prompt' nor 'messages' is" if self.prompt is None else "both 'prompt' and 'messages' are"
            raise ValueError(f"{given} given; give exactly one: 'prompt' (a string) or 'messages' ({{role, content}} list)")
        if self.messages is not None and self.messages[-1].role != "user":
            raise ValueError("the last of 'messages' is not from the user; end with the 'user' turn the model answers")
        return self

    def question_text(self) -> str:
        """The question alone (what a judge reads): the prompt, or the last user message."""
        return self.prompt if self.prompt is not None else self.messages[-1].content

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation to generate from, as chat-template messages."""
        if self.messages is None:
            return [{"role": "user", "content": self.prompt}]
        return [message.model_dump() for message in self.messages]


def load_prompts(path: str | Path) -> list[PromptRecord]:
    """All records of the JSONL file at `path`; a problem raises UserError naming FILE:LINE and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: prompt file not found; pass the path of an existing JSONL file")
    records: list[PromptRecord] = []
    line_of_id: dict[str, int] = {}
    with path.open("rb") as file:
        for line_number, raw_line in enumerate(file, start=1):
            record = _parse_line(raw_line, f"{path}:{line_number}")
            if record is None:
                continue
            if record.id in line_of_id:
                raise UserError(
                    f"{path}:{line_number}: duplicate id '{record.id}' (also at {path}:{line_of_id[record.id]}); "
                    "give every record a unique id"
                )
            line_of_id[record.id] = line_number
            records.append(record)
    if not records:
        raise UserError(f"{path}: the file has no prompt records; write one JSON object per line, e.g. {_EXAMPLE}")
    return records


def write_prompts(path: str | Path, records: Iterable[PromptRecord]) -> None:
    """Write `records` as JSONL; atomic, so on any failure a file already at `path` is left untouched."""
    with atomic_text_file(path) as file:
        written_ids: set[str] = set()
        for record in records:
            if not isinstance(record, PromptRecord):
                raise TypeError(f"write_prompts takes PromptRecord objects, got {type(record).__name__}")
            if record.id in written_ids:
                raise UserError(f"{path}: duplicate id '{record.id}' among the records to write; make ids unique")
            written_ids.add(record.id)
            file.write(record.model_dump_json(exclude_none=True) + "\n")


def _parse_line(raw_line: bytes, where: str) -> PromptRecord | None:
    """The record on one line, or None for a blank line."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: the line is not valid UTF-8; save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        value = json.loads(line.rstrip("\r\n"))  # so a column past the end points at the line, not the next
    except json.JSONDecodeError as error:
        raise UserError(
            f"{where}: invalid JSON ({error.msg} at column {error.colno}); write one complete JSON object per line"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(value).__name__}; write records like {_EXAMPLE}")
    try:
        return PromptRecord.model_validate(value)
    except pydantic.ValidationError as error:
        problems = error.errors()
        more = f" (and {len(problems) - 1} more problem(s) on this line)" if len(problems) > 1 else ""
        raise UserError(f"{where}: {_describe(problems[0])}{more}") from None


def _describe(problem: Any) -> str:
    """One pydantic error as 'what is wrong; how to fix'."""
    field = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "missing":
        return f"missing field '{field}'; add it (see the format in megatron_rl/data/prompts.py)"
    if problem["type"] == "extra_forbidden":
        allowed = ChatMessage.model_fields if field.startswith("messages.") else PromptRecord.model_fields
        return f"unknown field '{field}'; remove it or rename it to one of: {', '.join(allowed)}"
    if not field:  # a whole-record rule such as "exactly one of prompt or messages"
        return problem["msg"].removeprefix("Value error, ")
    shown = repr(problem["input"])
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"field '{field}': {problem['msg'].lower()} (got {shown}); correct the value"
