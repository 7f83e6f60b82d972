"""Response data for supervised training: SFT examples and DPO preference pairs (JSONL), and their tokens.

SFT file: one JSON object per line, a prompt record (data/prompts.py: `id`, `prompt` or `messages`, `type`,
`difficulty`) with `answer` optional, plus

    response    string: the assistant's reply to train on

Preference-pair file (DPO): the same prompt fields, plus

    chosen      string: the preferred reply
    rejected    string: the dispreferred reply

Example:  {"id": "q1-0", "prompt": "What is 2 + 3?", "answer": "5", "chosen": "5", "rejected": "2 + 3 is 6"}

Training sequences are prompt tokens (formatted as the RL run formats them: chat template, system prompt)
followed by the reply's tokens and the end-of-sequence token; the loss mask covers the reply and the
end-of-sequence token only, never the prompt.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pydantic
from pydantic import BaseModel, Field

from megatron_rl.atomic_file import atomic_text_file
from megatron_rl.data.formatting import encode_prompts
from megatron_rl.data.prompts import PromptRecord
from megatron_rl.errors import UserError

logger = logging.getLogger(__name__)


class SFTRecord(PromptRecord):
    """A prompt with the reply to imitate."""

    answer: str | None = Field(None, coerce_numbers_to_str=True)
    response: str = Field(min_length=1)


class PreferencePair(PromptRecord):
    """A prompt with a preferred and a dispreferred reply."""

    answer: str | None = Field(None, coerce_numbers_to_str=True)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


Record = TypeVar("Record", bound=BaseModel)


def load_records(path: str | Path, record_type: type[Record]) -> list[Record]:
    """Every record of the JSONL file (blank lines skipped); a bad line raises UserError naming FILE:LINE."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found; pass an existing JSONL file of {record_type.__name__} records")
    records: list[Record] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = record_type.model_validate(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: invalid JSON ({error.msg}); write one JSON object per line") from None
        except pydantic.ValidationError as error:
            problem = error.errors()[0]
            field = ".".join(str(part) for part in problem["loc"]) or "the record"
            raise UserError(f"{path}:{number}: {field}: {problem['msg']} (fields: "
                            f"{', '.join(record_type.model_fields)}; format: megatron_rl/data/sft_data.py)") from None
        identifier = getattr(record, "id")
        if identifier in seen:
            raise UserError(f"{path}:{number}: duplicate id '{identifier}' (also at line {seen[identifier]}); "
                            "give every record a unique id")
        seen[identifier] = number
        records.append(record)
    if not records:
        raise UserError(f"{path}: no records; write one JSON object per line (format: megatron_rl/data/sft_data.py)")
    return records


def write_records(path: str | Path, records: Iterable[BaseModel]) -> int:
    """Write `records` as JSONL atomically (a file already at `path` stays whole on failure); returns the count."""
    count = 0
    with atomic_text_file(path) as file:
        for record in records:
            file.write(record.model_dump_json(exclude_none=True) + "\n")
            count += 1
    return count


@dataclass(frozen=True)
class TrainingSequence:
    """Prompt + reply tokens; `loss_mask[t]` is 1 where token t is a reply token to learn."""

    token_ids: list[int]
    loss_mask: list[float]

    @property
    def response_tokens(self) -> int:
        return int(sum(self.loss_mask))


def reply_token_ids(tokenizer, reply: str) -> list[int]:
    """The reply's tokens as the engine would have generated them: the text, then end-of-sequence."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no end-of-sequence token; a trained reply could never end")
    return list(tokenizer(reply, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def encode_sequences(prompts: list[PromptRecord], replies: list[list[str]], tokenizer, apply_chat_template: bool,
                     max_sequence_length: int, source: str,
                     system_prompt: str | None = None) -> list[list[TrainingSequence] | None]:
    """For each prompt, its replies as training sequences, or None where one of them does not fit in
    `max_sequence_length` tokens (such prompts are counted in a warning)."""
    encoded = encode_prompts(prompts, tokenizer, apply_chat_template, max_sequence_length - 1, source, system_prompt)
    by_id = {prompt.record.id: prompt.input_ids for prompt in encoded}
    result: list[list[TrainingSequence] | None] = []
    too_long = 0
    for record, texts in zip(prompts, replies):
        prompt_ids = by_id.get(record.id)
        sequences = None
        if prompt_ids is not None:
            sequences = []
            for text in texts:
                reply_ids = reply_token_ids(tokenizer, text)
                sequences.append(TrainingSequence(prompt_ids + reply_ids, [0.0] * len(prompt_ids) + [1.0] * len(reply_ids)))
            if max(len(sequence.token_ids) for sequence in sequences) > max_sequence_length:
                sequences = None
        too_long += sequences is None
        result.append(sequences)
    if too_long:
        logger.warning("%s: %d record(s) longer than %d tokens are skipped", source, too_long, max_sequence_length)
    if all(sequences is None for sequences in result):
        raise UserError(f"{source}: no record fits in {max_sequence_length} tokens; raise model.max_sequence_length")
    return result
