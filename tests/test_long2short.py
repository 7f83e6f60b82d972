"""long2short: merging checkpoints of different TP/PP layouts, the selection rules of shortest rejection
sampling and DPO pairs, and the sampling commands end to end against a real embedded engine."""
from __future__ import annotations


import pytest
import torch

from cli_runner import run_cli
from megatron_rl.data.difficulty import GenerationSettings, engine_session
from megatron_rl.data.prompts import PromptRecord, write_prompts
from megatron_rl.data.sft_data import PreferencePair, SFTRecord, load_records
from megatron_rl.errors import UserError
from megatron_rl.hf_checkpoint import SafetensorsReader
from megatron_rl.long2short.dpo_pairs import preference_pairs, rejected_responses
from megatron_rl.long2short.merge import merge_checkpoints, merge_parameters_
from megatron_rl.long2short.rejection import shortest_correct, shortest_rejection_records
from megatron_rl.long2short.sampling import ScoredResponse, sample_responses
from megatron_rl.reward.math import extract_final_answer, math_reward
from megatron_rl.train.convert_commands import hf_to_mcore, mcore_to_hf
from tiny_models import write_tiny_hf_model


def test_merge_parameters_by_hand():
    target = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0], [-4.0]])}
    merge_parameters_(target, {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[8.0], [4.0]])}, weight=0.25)
    assert target["w"].tolist() == [2.5, 5.0]  # 0.25·1 + 0.75·3, 0.25·2 + 0.75·6
    assert target["b"].tolist() == [[6.0], [2.0]]
    with pytest.raises(ValueError, match="shape"):
        merge_parameters_({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, 0.5)


def test_merge_of_checkpoints_at_tp2_and_pp2_is_the_weighted_average(tiny_models, tmp_path):
    model_a, model_b = tiny_models["llama"], write_tiny_hf_model(tmp_path / "llama-b", "llama", seed=1)
    hf_to_mcore(model_a, tmp_path / "a", tp=2, pp=1)
    hf_to_mcore(model_b, tmp_path / "b", tp=1, pp=2)
    manifest = merge_checkpoints(tmp_path / "a", tmp_path / "b", 0.25, tmp_path / "merged", tp=1, pp=1)
    assert (manifest.tp, manifest.pp, manifest.has_optimizer) == (1, 1, False)
    assert manifest.extra["merge"]["weight"] == 0.25
    mcore_to_hf(tmp_path / "merged", tmp_path / "merged-hf")
    merged, a, b = (SafetensorsReader(path) for path in (tmp_path / "merged-hf", model_a, model_b))
    assert set(merged.names()) == set(a.names())
    for name in a.names():
        torch.testing.assert_close(merged.get(name), 0.25 * a.get(name) + 0.75 * b.get(name), rtol=0, atol=1e-6)


def test_merge_refuses_incompatible_checkpoints_and_bad_weights(tiny_models, tmp_path):
    hf_to_mcore(tiny_models["llama"], tmp_path / "llama", tp=1, pp=1)
    hf_to_mcore(tiny_models["qwen2"], tmp_path / "qwen2", tp=1, pp=1)
    with pytest.raises(UserError, match=r"different architectures \(.*family 'llama' vs 'qwen2'"):
        merge_checkpoints(tmp_path / "llama", tmp_path / "qwen2", 0.5, tmp_path / "merged")
    with pytest.raises(UserError, match=r"--weight must be in \[0, 1\]"):
        merge_checkpoints(tmp_path / "llama", tmp_path / "llama", 1.5, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("kept")
    assert run_cli("long2short", "merge", "--a", tmp_path / "llama", "--b", tmp_path / "llama", "--out",
                   tmp_path / "taken") == 2
    assert (tmp_path / "taken" / "file").read_text() == "kept"


def _response(text: str, tokens: int, correct: bool, truncated: bool = False) -> ScoredResponse:
    return ScoredResponse(text, tokens, correct, truncated)


SAMPLED = [
    _response("long right", 30, True),
    _response("short wrong", 5, False),
    _response("right", 10, True),
    _response("a bit longer right", 14, True),   # < 1.5 × 10: neither chosen nor rejected
    _response("longer wrong", 12, False),
    _response("cut off", 40, False, truncated=True),
    _response("right again", 10, True),          # ties with "right": the earlier sample wins
    _response("long right", 30, True),           # duplicate text: one pair only
]


def test_shortest_rejection_keeps_the_shortest_correct_response():
    assert shortest_correct(SAMPLED).text == "right"
    assert shortest_correct([_response("x", 3, False), _response("y", 2, False)]) is None
    record = PromptRecord(id="q", prompt="1 2", answer="2")
    kept = shortest_rejection_records([record, PromptRecord(id="unsolved", prompt="3", answer="3")],
                                      {"q": SAMPLED, "unsolved": [_response("4", 2, False)]})
    assert kept == [SFTRecord(id="q", prompt="1 2", answer="2", response="right")]


def test_dpo_pairs_reject_longer_wrong_and_much_longer_correct_responses():
    chosen = shortest_correct(SAMPLED)
    assert [r.text for r in rejected_responses(SAMPLED, chosen, 1.5)] == ["long right", "longer wrong", "cut off"]
    assert [r.text for r in rejected_responses(SAMPLED, chosen, 1.4)] == ["long right", "a bit longer right",
                                                                          "longer wrong", "cut off"]
    pairs = preference_pairs([PromptRecord(id="q", prompt="1 2", answer="2")], {"q": SAMPLED})
    assert [pair.id for pair in pairs] == ["q-0", "q-1", "q-2"]
    assert {pair.chosen for pair in pairs} == {"right"}
    with pytest.raises(ValueError, match="length_ratio"):
        rejected_responses(SAMPLED, chosen, 0.5)


def test_sampling_commands_end_to_end_on_the_tiny_model(tmp_path):
    """Random tiny-digits at temperature 1 writes random digit strings. So that some are right, each prompt's
    reference answer is taken from one of the model's own samples (drawn here with the same seeds first)."""
    questions = [PromptRecord(id=f"q{index}", prompt=f"{index} {index % 3}", answer="0") for index in range(10)]
    settings = GenerationSettings(max_new_tokens=6, temperature=1.0, seed=0, apply_chat_template=False)
    with engine_session(model="builtin:tiny-digits") as session:
        sampled = sample_responses(session, questions, 8, settings)
    answers = {record_id: extract_final_answer(responses[3].text) for record_id, responses in sampled.items()}
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, [record.model_copy(update={"answer": answers[record.id]}) for record in questions
                            if answers.get(record.id) is not None])
    common = ["--prompts", prompts, "--model", "builtin:tiny-digits", "--n", "8", "--max-new-tokens", "6",
              "--no-chat-template", "--seed", "0"]
    assert run_cli("long2short", "shortest-rejection", *common, "--out", tmp_path / "sft.jsonl") == 0
    assert run_cli("long2short", "dpo-pairs", *common, "--out", tmp_path / "pairs.jsonl") == 0
    kept = load_records(tmp_path / "sft.jsonl", SFTRecord)
    assert len(kept) >= 0.8 * len(answers)  # sample 3 is right at least (unless batching changed a draw)
    for record in kept:
        assert math_reward(record.response, record.answer) == 1.0
        assert len(record.response) <= len(sampled[record.id][3].text)  # no longer than the known right one
    pairs = load_records(tmp_path / "pairs.jsonl", PreferencePair)
    assert pairs
    # Both commands drew the same seeded samples: each pair's chosen response is the kept SFT response.
    kept_response = {record.id: record.response for record in kept}
    assert {pair.id.rsplit("-", 1)[0]: pair.chosen for pair in pairs}.items() <= kept_response.items()
    for pair in pairs:
        assert math_reward(pair.chosen, pair.answer) == 1.0 and pair.rejected != pair.chosen
        # Rejected: wrong and longer, or right and ≥ 1.5× as long (characters = tokens for this tokenizer).
        wrong = math_reward(pair.rejected, pair.answer) == 0.0
        assert len(pair.rejected) > len(pair.chosen) if wrong else len(pair.rejected) >= 1.5 * len(pair.chosen)
    assert run_cli("long2short", "shortest-rejection", *common, "--out", prompts) == 2  # never overwrites its input
    assert len(prompts.read_text().splitlines()) == len(answers)
