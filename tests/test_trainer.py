"""The trainer core and checkpoints on the real megatron-core code (CPU, gloo)."""
from pathlib import Path

import pytest
import torch

from megatron_rl.config import load_config
from megatron_rl.hf_checkpoint import SafetensorsReader, read_hf_config
from megatron_rl.train import parallel
from megatron_rl.train.checkpoint import read_manifest
from megatron_rl.train.convert_commands import megatron_full_logits
from megatron_rl.train.model import architecture_from_hf_config
from megatron_rl.train.trainer import PolicyTrainer, TrainBatch
from megatron_rl.errors import UserError


def toy_batch(samples: int = 8, seed: int = 0) -> TrainBatch:
    generator = torch.Generator().manual_seed(seed)
    token_ids, loss_mask, rewards, group_ids = [], [], [], []
    for index in range(samples):
        prompt = torch.randint(1, 128, (5,), generator=generator).tolist()
        response = torch.randint(1, 128, (3 + index,), generator=generator).tolist()
        token_ids.append(prompt + response)
        loss_mask.append([0.0] * len(prompt) + [1.0] * len(response))
        rewards.append(float(index % 3 == 0))
        group_ids.append(index // 4)
    return TrainBatch(token_ids, loss_mask, rewards, group_ids)


def make_trainer(hf_dir: Path, overrides: list[str]) -> PolicyTrainer:
    config = load_config(None, ["train.lr=1e-3", "train.micro_batch_size=2", *overrides])
    trainer = PolicyTrainer(config, architecture_from_hf_config(read_hf_config(hf_dir)), hf_dir)
    trainer.load_hf(SafetensorsReader(hf_dir))
    return trainer


def _train_two_iterations(hf_dir: Path, tp: int, pp: int, loss: str):
    with parallel.model_parallel(tp, pp):
        trainer = make_trainer(hf_dir, [f"algo.loss={loss}", "train.optimizer_steps_per_iteration=2"])
        metrics = [trainer.train_iteration(toy_batch()) for _ in range(2)]
        logprobs = trainer.compute_logprobs(toy_batch().token_ids)
        return metrics, {index: values.sum().item() for index, values in logprobs.items()}


@pytest.mark.parametrize("loss", ["k15", "grpo"])
def test_tp2_and_pp2_train_like_tp1(tiny_models, loss):
    hf_dir = tiny_models["qwen2"]  # tied embeddings: exercises the PP embedding all-reduce
    reference_metrics, reference_logprobs = parallel.launch(_train_two_iterations, 1, hf_dir, 1, 1, loss)[0]
    for tp, pp in [(2, 1), (1, 2)]:
        results = parallel.launch(_train_two_iterations, 2, hf_dir, tp, pp, loss)
        metrics = results[0][0]
        logprobs = {index: value for _, per_rank in results for index, value in per_rank.items()}
        for step, expected in zip(metrics, reference_metrics):
            assert step["loss"] == pytest.approx(expected["loss"], rel=1e-4), (tp, pp)
            assert step["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4), (tp, pp)
        assert set(logprobs) == set(reference_logprobs)
        for index, value in reference_logprobs.items():
            assert logprobs[index] == pytest.approx(value, abs=2e-3), (tp, pp, index)
    # Training moved the policy: the log-probs of the rewarded samples changed.
    assert reference_metrics[0]["grad_norm"] > 0


def _single_rank_behaviour(hf_dir: Path):
    with parallel.model_parallel(1, 1):
        results = {}
        # At θ = θ_i the k1.5 log-ratio is zero: the first step is plain mean-baseline REINFORCE.
        trainer = make_trainer(hf_dir, ["train.optimizer_steps_per_iteration=1"])
        results["first_logratio"] = trainer.train_iteration(toy_batch())["logratio_mean"]
        # Optimizer reset: Adam moments exist after an iteration and are gone after a reset.
        states = [len(o.optimizer.state) for o in trainer.optimizer.chained_optimizers]
        trainer.reset_optimizer_state()
        results["state_sizes"] = (states, [len(o.optimizer.state) for o in trainer.optimizer.chained_optimizers])
        # Reset-per-iteration equals a fresh optimizer at every iteration: compare with new trainers.
        resetting = make_trainer(hf_dir, ["train.reset_optimizer_each_iteration=true"])
        keeping = make_trainer(hf_dir, ["train.reset_optimizer_each_iteration=false"])
        for iteration in range(2):
            for trainer_ in (resetting, keeping):
                trainer_.train_iteration(toy_batch(seed=iteration))
        results["reset_vs_keep_differ"] = any(
            not torch.equal(a, b) for a, b in zip(resetting.model.parameters(), keeping.model.parameters())
        )
        # LR warm-up: the schedule raises the LR step by step.
        warming = make_trainer(hf_dir, ["train.lr_warmup_steps=4", "train.optimizer_steps_per_iteration=2"])
        results["warmup_lrs"] = [warming.train_iteration(toy_batch())["lr"] for _ in range(2)]
        # NaN loss: the step is skipped and counted, the weights stay as they were.
        broken = make_trainer(hf_dir, [])
        before = [p.detach().clone() for p in broken.model.parameters()]
        bad = toy_batch()
        bad.rewards[0] = float("nan")
        metrics = broken.train_iteration(bad)
        results["nan"] = (metrics["skipped_steps"], broken.skipped_steps,
                          all(torch.equal(a, b) for a, b in zip(before, broken.model.parameters())))
        # Masked tokens give no gradient: a batch whose masks are all zero leaves zero grads.
        silent = toy_batch()
        silent.loss_mask = [[0.0] * len(mask) for mask in silent.loss_mask]
        results["masked_grad_norm"] = make_trainer(hf_dir, ["train.grad_clip=0"]).train_iteration(silent)["grad_norm"]
        # bf16: the optimizer's fp32 main weights follow the loaded HF weights, not the random init.
        tokens = torch.tensor([toy_batch().token_ids[0]])
        expected = megatron_full_logits(make_trainer(hf_dir, []).model, tokens)
        bf16 = make_trainer(hf_dir, ["model.dtype=bfloat16", "train.lr=1e-6"])
        bf16.train_iteration(toy_batch())
        results["bf16_logits_difference"] = (megatron_full_logits(bf16.model, tokens) - expected).abs().max().item()
        results["logit_scale"] = expected.abs().max().item()
        return results


def test_trainer_single_rank_behaviour(tiny_models):
    results = parallel.launch(_single_rank_behaviour, 1, tiny_models["llama"])[0]
    assert results["first_logratio"] == pytest.approx(0.0, abs=1e-6)
    before_reset, after_reset = results["state_sizes"]
    assert sum(before_reset) > 0 and sum(after_reset) == 0
    assert results["reset_vs_keep_differ"]
    first, second = results["warmup_lrs"]
    assert 0 < first < second <= 1e-3
    skipped_in_metrics, skipped_total, unchanged = results["nan"]
    assert skipped_in_metrics == 1 and skipped_total == 1 and unchanged
    assert results["masked_grad_norm"] == 0.0
    assert results["bf16_logits_difference"] < 0.05 * results["logit_scale"]


def test_train_batch_rejects_misaligned_masks():
    with pytest.raises(ValueError, match="same length"):
        TrainBatch([[1, 2, 3]], [[0, 1]], [1.0], [0])


def _save_at_tp2(hf_dir: Path, checkpoint: Path, tokens: torch.Tensor):
    with parallel.model_parallel(2, 1):
        trainer = make_trainer(hf_dir, [])
        trainer.train_iteration(toy_batch())  # weights and Adam state differ from the HF files now
        trainer.save(checkpoint, iteration=7)
        return megatron_full_logits(trainer.model, tokens)


def _load_at_tp1(hf_dir: Path, checkpoint: Path, tokens: torch.Tensor):
    with parallel.model_parallel(1, 1):
        trainer = make_trainer(hf_dir, [])
        manifest = trainer.load(checkpoint)
        states = sum(len(o.optimizer.state) for o in trainer.optimizer.chained_optimizers)
        return megatron_full_logits(trainer.model, tokens), manifest.iteration, states


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_same_logits(tiny_models, tmp_path):
    hf_dir = tiny_models["llama"]
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    saved_logits = parallel.launch(_save_at_tp2, 2, hf_dir, tmp_path / "checkpoint", tokens)[0]
    manifest = read_manifest(tmp_path / "checkpoint")
    assert (manifest.tp, manifest.pp, manifest.iteration, manifest.has_optimizer) == (2, 1, 7, True)
    assert not (tmp_path / "checkpoint.tmp").exists()
    loaded_logits, iteration, optimizer_states = parallel.launch(_load_at_tp1, 1, hf_dir, tmp_path / "checkpoint", tokens)[0]
    assert iteration == 7 and optimizer_states > 0
    assert (loaded_logits - saved_logits).abs().max().item() < 1e-5


def test_half_written_checkpoint_is_not_a_checkpoint(tmp_path):
    (tmp_path / "ckpt.tmp" / "model").mkdir(parents=True)
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(tmp_path / "ckpt.tmp")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_manifest(tmp_path / "bad")


def _offload_round_trip(hf_dir: Path, dtype: str):
    from megatron_rl.train.offload import TrainerOffload

    with parallel.model_parallel(1, 1):
        overrides = [f"model.dtype={dtype}", "train.reset_optimizer_each_iteration=false"]
        moved, kept = make_trainer(hf_dir, overrides), make_trainer(hf_dir, overrides)
        for trainer in (moved, kept):
            trainer.train_iteration(toy_batch(seed=0))  # Adam state and grads exist now
        offload = TrainerOffload(moved)
        state = [t.detach().clone() for t in offload._kept_tensors()]
        parameters = {name: p.detach().clone() for name, p in moved.model.named_parameters()}
        offloaded = offload.offload()
        held = sum(t.untyped_storage().nbytes() for t in offload._kept_tensors() + offload._gradient_tensors())
        # While offloaded, the weights are readable from the pinned copies (the weight sync reads them there).
        readable = all(torch.equal(parameters[name], copy) for name, copy in offload.named_parameters())
        onloaded = offload.onload()
        restored = all(torch.equal(a, b) for a, b in zip(state, offload._kept_tensors()))
        # Training on after the round trip is exactly training on without it.
        after = [trainer.train_iteration(toy_batch(seed=1)) for trainer in (moved, kept)]
        same = all(torch.equal(a, b) for a, b in zip(moved.model.parameters(), kept.model.parameters()))
        return offloaded, held, readable, onloaded, restored, after, same


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_offload_frees_every_storage_and_onload_restores_it_bitwise(tiny_models, dtype):
    offloaded, held, readable, onloaded, restored, after, same = parallel.launch(
        _offload_round_trip, 1, tiny_models["qwen2"], dtype)[0]
    assert held == 0 and readable  # parameters, master weights, Adam moments and the grad buffer: all freed
    assert offloaded.bytes_copied > 0 and offloaded.bytes_freed_or_restored > offloaded.bytes_copied  # grads: freed, not copied
    assert onloaded.bytes_copied == offloaded.bytes_copied
    assert onloaded.bytes_freed_or_restored == offloaded.bytes_freed_or_restored
    assert restored and same
    assert after[0] == after[1]
