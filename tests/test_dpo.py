"""DPO: the loss against hand-computed values, and `megatron-rl dpo` on megatron-core (tiny model, CPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cli_runner import run_cli
from megatron_rl.algo.dpo import dpo_loss, sequence_logprobs
from megatron_rl.errors import UserError
from megatron_rl.train.dpo import load_dpo_config


def test_dpo_loss_matches_hand_computed_values():
    # Pair 0: β·((−1 − −2) − (−3 − −2)) = 0.5·(1 + 1) = 1 → −log σ(1) = log(1 + e⁻¹).
    # Pair 1: both responses moved alike → margin 0 → log 2.
    policy_chosen = torch.tensor([-1.0, -4.0], requires_grad=True)
    output = dpo_loss(policy_chosen, torch.tensor([-3.0, -6.0]), torch.tensor([-2.0, -5.0]), torch.tensor([-2.0, -7.0]),
                      beta=0.5)
    assert output.per_sample_loss.tolist() == pytest.approx([math.log(1 + math.exp(-1)), math.log(2)])
    assert output.loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    assert output.metrics["reward_margin_mean"].item() == pytest.approx(0.5)
    assert output.metrics["chosen_reward_mean"].item() == pytest.approx((0.5 + 0.5) / 2)
    assert output.metrics["rejected_reward_mean"].item() == pytest.approx((-0.5 + 0.5) / 2)
    assert output.metrics["preference_accuracy"].item() == 0.5  # a zero margin is not a preference
    # d/dπ_c of −log σ(β·Δ) = −β·(1 − σ(β·Δ)), halved by the mean over two pairs.
    output.loss.backward()
    sigmoid_one = 1 / (1 + math.exp(-1))
    assert policy_chosen.grad.tolist() == pytest.approx([-0.5 * (1 - sigmoid_one) / 2, -0.5 * 0.5 / 2])


def test_sft_weight_adds_the_chosen_per_token_nll():
    plain = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    mixed = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5,
                     sft_weight=2.0, chosen_tokens=torch.tensor([4.0]))
    assert mixed.per_sample_loss.item() == pytest.approx(plain.per_sample_loss.item() + 2.0 * 1.0 / 4)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5, sft_weight=1.0)


def test_sequence_logprobs_sum_the_masked_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert sequence_logprobs(logprobs, mask).tolist() == [-3.0, -4.25]


def _write_pairs(path, count: int) -> None:
    with path.open("w") as file:
        for index in range(count):
            digits = f"{index % 10} {(3 * index) % 10} {(7 * index + 1) % 10}"
            answer = digits[-1]
            file.write(json.dumps({"id": f"p{index}", "prompt": digits, "answer": answer, "chosen": f" = {answer}",
                                   "rejected": f" {digits} {digits} = {answer}"}) + "\n")


@pytest.mark.parametrize("layout", [(1, 1), (1, 2)])
def test_dpo_command_starts_at_log2_and_prefers_the_chosen_responses(tmp_path, layout):
    tp, pp = layout
    pairs = tmp_path / "pairs.jsonl"
    _write_pairs(pairs, 12)
    out = tmp_path / "dpo"
    assert run_cli("dpo", "--out", out, "model.hf_path=builtin:tiny-digits", f"data.train_file={pairs}",
                   "data.apply_chat_template=false", "data.batch_size=6", "data.epochs=3", "train.lr=0.003",
                   "train.micro_batch_size=2", "dpo.beta=0.5", f"parallel.tp={tp}", f"parallel.pp={pp}") == 0
    history = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 6
    # At the first step the policy is the reference: every implicit reward is 0, the loss exactly log 2 —
    # which holds only if the reference log-probs were computed for the same tokens and masks.
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[0]["reward_margin_mean"] == pytest.approx(0.0, abs=1e-5)
    assert history[-1]["reward_margin_mean"] > 0.5 and history[-1]["loss"] < history[0]["loss"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["tp"], manifest["pp"], manifest["has_optimizer"]) == (tp, pp, False)


def test_dpo_config_names_misplaced_fields(tmp_path):
    with pytest.raises(UserError, match="train.iterations belong to RL runs"):
        load_dpo_config(None, ["model.hf_path=builtin:tiny-digits", "data.train_file=x", "train.iterations=3"])
    with pytest.raises(UserError, match="exactly one of model.hf_path"):
        load_dpo_config(None, ["data.train_file=x"])
    with pytest.raises(UserError, match="dpo.betta.*unknown key"):
        load_dpo_config(None, ["model.hf_path=builtin:tiny-digits", "data.train_file=x", "dpo.betta=1"])
    with pytest.raises(UserError, match="dpo.beta"):
        load_dpo_config(None, ["model.hf_path=builtin:tiny-digits", "data.train_file=x", "dpo.beta=0"])
