"""SFT: response-only loss masks, `megatron-rl sft` on megatron-core against transformers' NLL, and
`long2short evaluate` on the checkpoint it writes (tiny model, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from cli_runner import run_cli
from megatron_rl.builtin_models import tiny_digits_tokenizer
from megatron_rl.data.prompts import PromptRecord, write_prompts
from megatron_rl.data.sft_data import SFTRecord, encode_sequences, load_records, write_records
from megatron_rl.errors import UserError
from megatron_rl.hf_checkpoint import resolve_hf_dir

RECORDS = [SFTRecord(id=f"r{index}", prompt=f"{index} {index + 1} {index + 2}", answer=str((index + 2) % 10),
                     response=f" = {(index + 2) % 10}") for index in range(8)]


def test_loss_mask_covers_the_response_and_its_end_only():
    tokenizer = tiny_digits_tokenizer()
    [[sequence]] = encode_sequences([RECORDS[1]], [[RECORDS[1].response]], tokenizer, False, 64, "test")
    text = [tokenizer.convert_ids_to_tokens(token) for token in sequence.token_ids]
    assert text == ["1", " ", "2", " ", "3", " ", "=", " ", "3", "<eos>"]
    assert sequence.loss_mask == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_records_too_long_for_the_context_are_skipped():
    tokenizer = tiny_digits_tokenizer()
    long_record = RECORDS[0].model_copy(update={"response": " 1" * 40})
    encoded = encode_sequences([RECORDS[0], long_record], [[RECORDS[0].response], [long_record.response]],
                               tokenizer, False, 32, "test")
    assert encoded[0] is not None and encoded[1] is None
    with pytest.raises(UserError, match="no record fits"):
        encode_sequences([long_record], [[long_record.response]], tokenizer, False, 32, "test")


def test_sft_files_name_the_bad_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "1", "response": "2"}) + "\n" + json.dumps({"id": "b", "prompt": "1"}) + "\n")
    with pytest.raises(UserError, match=r"sft.jsonl:2: response: Field required"):
        load_records(path, SFTRecord)


def _transformers_response_nll(model_dir, sequences) -> float:
    """Token-mean NLL of the masked tokens, computed by transformers (independent of megatron)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    total, count = 0.0, 0
    with torch.no_grad():
        for sequence in sequences:
            tokens = torch.tensor([sequence.token_ids])
            logprobs = torch.log_softmax(model(tokens).logits[0, :-1].float(), dim=-1)
            picked = logprobs.gather(1, tokens[0, 1:, None])[:, 0]
            mask = torch.tensor(sequence.loss_mask[1:])
            total -= (picked * mask).sum().item()
            count += int(mask.sum().item())
    return total / count


def test_sft_command_trains_on_responses_and_its_checkpoint_evaluates(tmp_path):
    data = tmp_path / "sft.jsonl"
    write_records(data, RECORDS)
    out = tmp_path / "sft"
    assert run_cli("sft", "--out", out, "model.hf_path=builtin:tiny-digits", f"data.train_file={data}",
                   "data.apply_chat_template=false", "data.batch_size=8", "data.epochs=6", "train.lr=0.003",
                   "train.micro_batch_size=3") == 0
    history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in history] == [1, 2, 3, 4, 5, 6]
    # The first step's loss is taken before any update: it must be the start model's NLL of the response
    # tokens alone (a loss that counted prompt tokens, or missed the end token, would differ).
    sequences = [pair[0] for pair in encode_sequences(RECORDS, [[r.response] for r in RECORDS], tiny_digits_tokenizer(),
                                                      False, 128, "test")]
    assert history[0]["loss"] == pytest.approx(_transformers_response_nll(resolve_hf_dir("builtin:tiny-digits"), sequences), rel=1e-4)
    assert history[0]["response_tokens"] == sum(s.response_tokens for s in sequences)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]  # it learns (seeded: the same run every time)

    prompts = tmp_path / "held_out.jsonl"
    write_prompts(prompts, [PromptRecord(id=r.id, prompt=r.prompt, answer=r.answer) for r in RECORDS[:4]])
    result_file = tmp_path / "eval.json"
    assert run_cli("long2short", "evaluate", "--prompts", prompts, "--model", out, "--max-new-tokens", "6",
                   "--no-chat-template", "--json", result_file) == 0
    result = json.loads(result_file.read_text())
    assert result["prompts"] == 4 and 0.0 <= result["accuracy"] <= 1.0
    assert 1 <= result["mean_response_tokens"] <= 6


def test_sft_refuses_an_existing_output(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept").write_text("x")
    data = tmp_path / "sft.jsonl"
    write_records(data, RECORDS)
    assert run_cli("sft", "--out", tmp_path / "out", "model.hf_path=builtin:tiny-digits", f"data.train_file={data}") == 2
    assert "choose a new --out" in capsys.readouterr().err
    assert (tmp_path / "out" / "kept").read_text() == "x"
