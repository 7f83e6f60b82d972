"""The JSONL prompt-set format: loading with FILE:LINE errors, atomic writing."""
import json

import pytest

from megatron_rl.data import ChatMessage, PromptRecord, load_prompts, write_prompts
from megatron_rl.errors import UserError

GOOD = '{"id": "a", "prompt": "What is 2 + 3?", "answer": "5"}'


def _write_lines(tmp_path, lines: list[str] | bytes):
    path = tmp_path / "prompts.jsonl"
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("lines", "line", "fragment"),
    [
        ([GOOD, "", '{"id": "b", "prompt": "x"'], 3, "invalid JSON"),
        ([GOOD, '{"id": "b", "prompt": "x"}'], 2, "missing field 'answer'; add it"),
        ([GOOD, '{"id": "b", "prompt": ["x"], "answer": "1"}'], 2, "field 'prompt': input should be a valid string"),
        (['{"id": "b", "prompt": "x", "answer": "1", "difficulty": 1.5}'], 1, "field 'difficulty'"),
        (['{"id": "b", "prompt": "x", "answer": "1", "hint": "y"}'], 1, "unknown field 'hint'; remove it"),
        (['{"id": "b", "answer": "1"}'], 1, "neither 'prompt' nor 'messages'"),
        (['{"id": "b", "prompt": "x", "messages": [{"role": "user", "content": "x"}], "answer": "1"}'], 1, "both"),
        (['{"id": "b", "messages": [{"role": "robot", "content": "x"}], "answer": "1"}'], 1, "messages.0.role"),
        (['{"id": "b", "messages": [{"role": "assistant", "content": "x"}], "answer": "1"}'], 1, "end with the 'user' turn"),
        (['["a list"]'], 1, "expected a JSON object"),
        ([GOOD, "", GOOD], 3, "duplicate id 'a' (also at {path}:1)"),
    ],
)
def test_every_record_error_names_file_and_line(tmp_path, lines, line, fragment):
    path = _write_lines(tmp_path, lines)
    with pytest.raises(UserError) as error:
        load_prompts(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: ")
    assert fragment.format(path=path) in message
    assert "\n" not in message


def test_invalid_utf8_names_the_line(tmp_path):
    path = _write_lines(tmp_path, GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(UserError, match=rf"^{path}:2: the line is not valid UTF-8"):
        load_prompts(path)


def test_empty_and_missing_files_name_the_file(tmp_path):
    empty = _write_lines(tmp_path, ["", "   "])
    with pytest.raises(UserError, match=rf"^{empty}: the file has no prompt records; write one JSON object"):
        load_prompts(empty)
    with pytest.raises(UserError, match=rf"^{tmp_path}/absent.jsonl: prompt file not found"):
        load_prompts(tmp_path / "absent.jsonl")


def test_write_then_load_round_trips(tmp_path):
    records = [
        PromptRecord(id="q1", prompt="What is 2 + 3?", answer="5", difficulty=0.25),
        PromptRecord(
            id="q2",
            messages=[ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="1/2 + 1/2?")],
            answer="1",
            type="code",
        ),
    ]
    path = tmp_path / "new" / "prompts.jsonl"
    write_prompts(path, records)
    assert load_prompts(path) == records
    assert "difficulty" not in json.loads(path.read_text().splitlines()[1])  # unset fields are not written
    assert records[0].chat_messages() == [{"role": "user", "content": "What is 2 + 3?"}]
    assert records[1].chat_messages()[0] == {"role": "system", "content": "Be brief."}


def test_numbers_are_accepted_as_id_and_answer(tmp_path):
    path = _write_lines(tmp_path, ['{"id": 7, "prompt": "3 + 4?", "answer": 7}'])
    assert load_prompts(path)[0].model_dump(include={"id", "answer"}) == {"id": "7", "answer": "7"}


def test_failed_write_leaves_the_existing_file_intact(tmp_path):
    path = _write_lines(tmp_path, [GOOD])
    before = path.read_bytes()
    # model_construct skips validation, so the record reaches the writer with a value JSON cannot hold.
    unserialisable = PromptRecord.model_construct(id="b", prompt="x", answer=object(), type="math")
    with pytest.raises(Exception, match="serialize"):
        write_prompts(path, [PromptRecord(id="c", prompt="y", answer="1"), unserialisable])
    assert path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left behind
