"""Partial rollouts against real embedded-engine servers (tiny model, 127.0.0.1): trajectories continued
over iterations, budgets, staleness, group bookkeeping, repeat detection, and the loss policy for old
segments."""
from __future__ import annotations

import math
import threading

import pytest
import torch

from megatron_rl import algo
from megatron_rl.data.formatting import EncodedPrompt
from megatron_rl.data.prompts import PromptRecord
from megatron_rl.data.sampler import PromptSampler
from megatron_rl.reward.repetition import RepetitionConfig
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.engine_process import EmbeddedEngineProcess
from megatron_rl.rollout.master import RolloutMaster
from megatron_rl.rollout.partial import Group, PartialRollout, PartialRolloutSettings, Trajectory, run_groups
from megatron_rl.rollout.protocol import GenerateRequest, SamplingParams
from megatron_rl.train.trainer import TrainBatch
from tiny_models import write_tiny_hf_model

SLOTS = 3


def encoded(index: int) -> EncodedPrompt:
    """Prompt `index` of the tiny model (vocabulary 128)."""
    return EncodedPrompt(PromptRecord(id=f"p{index}", prompt=f"prompt {index}", answer="0"),
                         [(7 * index + offset) % 120 + 3 for offset in range(5)])


def decode(token_ids: list[int]) -> str:
    return " ".join(map(str, token_ids))


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)


def serve(model, log_path, *extra_args: str) -> EmbeddedEngineProcess:
    engine = EmbeddedEngineProcess(model, log_path, load_format="auto", max_running_requests=SLOTS,
                                   extra_args=("--random-seed", "0", *extra_args))
    engine.start(timeout=120)
    return engine


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_hf_model(tmp_path_factory.mktemp("partial-model") / "qwen3", "qwen3", seed=0)


@pytest.fixture(scope="module")
def deterministic_engine(model, tmp_path_factory):
    engine = serve(model, tmp_path_factory.mktemp("deterministic") / "engine.log", "--enable-deterministic-inference")
    yield EngineClient(engine.url, timeout=60)
    engine.stop()


@pytest.fixture(scope="module")
def batched_engine(model, tmp_path_factory):
    engine = serve(model, tmp_path_factory.mktemp("batched") / "engine.log")
    yield EngineClient(engine.url, timeout=60)
    engine.stop()


def roll_out_until_finished(master, group, settings, client, max_iterations=10, repetition=None) -> list[int]:
    """Run iterations 1, 2, ... over `group` alone, the engine reporting weight version str(iteration)
    (same weights, a new label: so segments show which iteration made them); the iterations it took."""
    iterations = []
    for iteration in range(1, max_iterations + 1):
        client.update_weight_version(str(iteration))
        result = run_groups(master, [group], iteration, str(iteration), greedy(settings.max_new_tokens), settings,
                            decode, repetition=repetition)
        iterations.append(iteration)
        assert not result.failed_groups
        if group.finished:
            assert result.finished_groups == [group]
            return iterations
        assert result.finished_groups == [] and result.carried_over_tokens == result.output_tokens
    raise AssertionError(f"group not finished after {max_iterations} iterations")


def test_a_trajectory_longer_than_its_budget_finishes_over_iterations_bit_for_bit(deterministic_engine):
    client = deterministic_engine
    prompt = encoded(1)
    uninterrupted = client.generate([GenerateRequest(input_ids=prompt.input_ids, sampling_params=greedy(17))])[0]
    with RolloutMaster([client]) as master:
        # A budget of 5 tokens per iteration: 17 tokens take 4 iterations (5 + 5 + 5 + 2).
        settings = PartialRolloutSettings(samples_per_prompt=2, groups_per_iteration=1, max_new_tokens=17,
                                          segment_token_budget=5, max_iterations_per_trajectory=10)
        group = Group.new(0, 1, prompt, 1, 2, lambda _: 17, seed_key=(0,))
        assert roll_out_until_finished(master, group, settings, client) == [1, 2, 3, 4]
        for trajectory in group.trajectories:
            assert trajectory.response_ids == uninterrupted.output_ids
            assert trajectory.response_logprobs == uninterrupted.output_logprobs  # bitwise
            assert [(s.iteration, s.weight_version, len(s.token_ids)) for s in trajectory.segments] == [
                (1, "1", 5), (2, "2", 5), (3, "3", 5), (4, "4", 2)]
            assert trajectory.finish_reason == "length" and trajectory.token_ids == prompt.input_ids + uninterrupted.output_ids

        # At its staleness bound (2 iterations) a trajectory is generated to the end, still the same tokens.
        bounded = PartialRolloutSettings(samples_per_prompt=1, groups_per_iteration=1, max_new_tokens=17,
                                         segment_token_budget=5, max_iterations_per_trajectory=2)
        group = Group.new(1, 1, prompt, 1, 1, lambda _: 17, seed_key=(1,))
        assert roll_out_until_finished(master, group, bounded, client) == [1, 2]
        trajectory = group.trajectories[0]
        assert trajectory.response_ids == uninterrupted.output_ids
        assert trajectory.response_logprobs == uninterrupted.output_logprobs
        assert [len(s.token_ids) for s in trajectory.segments] == [5, 12]
    client.update_weight_version("default")


def test_masked_old_segments_get_no_gradient_and_kept_ones_do():
    trajectory = Trajectory(encoded(0), group_id=0, sample_index=0, max_new_tokens=10, started_iteration=1)
    trajectory.extend(1, "0", [4, 5], [-0.1, -0.2])  # generated by the weights before the trainer's
    trajectory.extend(2, "1", [6, 7, 8], [-0.3, -0.4, -0.5])  # by the trainer's current weights, "1"
    trajectory.finish_reason = "stop"
    prompt_length = len(trajectory.prompt.input_ids)
    old = range(prompt_length - 1, prompt_length + 1)  # positions predicting tokens 4 and 5
    current = range(prompt_length + 1, prompt_length + 4)
    elsewhere = [*range(prompt_length - 1), prompt_length + 4]
    logprobs_engine = trajectory.rollout_logprobs("1")
    assert all(math.isnan(value) for value in logprobs_engine[: prompt_length + 2])
    assert logprobs_engine[prompt_length + 2:] == [-0.3, -0.4, -0.5]
    for loss in ("k15", "grpo"):
        gradients = {}
        for policy in ("mask", "keep"):
            batch = TrainBatch(token_ids=[trajectory.token_ids], loss_mask=[trajectory.loss_mask("1", policy)],
                               rewards=[1.0], group_ids=[0], rollout_logprobs=[logprobs_engine])
            mask = torch.tensor([batch.position_loss_mask(0)])
            torch.manual_seed(0)
            logprobs = (torch.randn(1, len(trajectory.token_ids)) - 2.0).requires_grad_()
            reference = logprobs.detach() + 0.1
            advantages = torch.tensor([0.7])
            output = (algo.k15_loss(logprobs, reference, mask, advantages, tau=0.1) if loss == "k15" else
                      algo.grpo_loss(logprobs, reference, reference, mask, advantages, 0.2, 0.0))
            output.loss.backward()
            gradients[policy] = logprobs.grad[0]
        masked, kept = gradients["mask"], gradients["keep"]
        assert torch.all(masked[list(old)] == 0) and torch.all(masked[list(current)] != 0)
        assert torch.all(kept[list(old)] != 0) and torch.all(kept[list(current)] != 0)
        assert torch.all(masked[elsewhere] == 0) and torch.all(kept[elsewhere] == 0)


def test_the_iteration_budget_stops_running_requests_and_their_groups_finish_later(batched_engine):
    prompts = [encoded(index) for index in range(8)]
    # Odd groups have one long sample: they cannot finish inside one iteration's budget.
    limits = lambda group_id, sample_index: 60 if group_id % 2 and sample_index == 1 else 4  # noqa: E731
    settings = PartialRolloutSettings(samples_per_prompt=2, groups_per_iteration=2, max_new_tokens=60,
                                      iteration_token_budget=24, max_iterations_per_trajectory=3)
    with RolloutMaster([batched_engine]) as master:
        rollout = PartialRollout(master, prompts, PromptSampler(len(prompts), seed=3), greedy(60), settings, decode,
                                 trajectory_token_limit=limits)
        first = rollout.run_iteration(1, "default")
        assert len(first.finished_groups) >= 2 and first.output_tokens >= 24 and first.stopped_requests >= 1
        assert all(group.finished for group in first.finished_groups)
        unfinished = {group.group_id: group for group in rollout.groups}
        assert any(group_id % 2 for group_id in unfinished)  # a long sample was stopped, its group waits
        saved = {(g.group_id, t.sample_index): list(t.response_ids) for g in unfinished.values() for t in g.trajectories}
        assert first.carried_over_tokens == sum(t.tokens_in(1) for g in unfinished.values()
                                                for t in g.trajectories if not t.finished) > 0
        finished = {group.group_id: group for group in first.finished_groups}
        for iteration in (2, 3):
            result = rollout.run_iteration(iteration, "default")
            assert not finished.keys() & {group.group_id for group in result.finished_groups}  # each group once
            finished.update({group.group_id: group for group in result.finished_groups})
        # The staleness bound (3 iterations): every group started in iteration 1 is finished by iteration 3.
        assert unfinished.keys() <= finished.keys()
    assert set(finished) | {group.group_id for group in rollout.groups} == set(range(rollout.next_group_id))
    for group in finished.values():
        assert len(group.trajectories) == 2  # rewarded only with all its samples, each exactly once
        for trajectory in group.trajectories:
            assert trajectory.response_length == limits(group.group_id, trajectory.sample_index)  # nothing lost or doubled
            assert trajectory.response_ids[: len(saved.get((group.group_id, trajectory.sample_index), []))] == \
                saved.get((group.group_id, trajectory.sample_index), [])  # continued, not restarted
            assert [s.iteration for s in trajectory.segments] == sorted({s.iteration for s in trajectory.segments})


def test_an_interrupted_iteration_tried_again_draws_no_more_groups_and_loses_no_token(batched_engine):
    """What pause --now + resume and a re-pushed engine do: the same iteration again, after an interruption."""
    prompts = [encoded(index) for index in range(8)]
    settings = PartialRolloutSettings(samples_per_prompt=2, groups_per_iteration=3, max_new_tokens=40)
    interrupt = threading.Event()
    with RolloutMaster([batched_engine]) as master:
        rollout = PartialRollout(master, prompts, PromptSampler(len(prompts), seed=3), greedy(40), settings, decode)
        first = rollout.run_iteration(1, "default", interrupt=interrupt,
                                      on_trajectory_done=lambda _: interrupt.set())  # stop at the first finish
        # Every group drawn stays, finished or not, for the next attempt.
        assert first.interrupted and {g.group_id for g in rollout.groups} == set(range(rollout.next_group_id))
        kept = {(g.group_id, t.sample_index): list(t.response_ids) for g in rollout.groups for t in g.trajectories}
        assert 0 < sum(len(tokens) for tokens in kept.values()) < 3 * 2 * 40
        again = rollout.run_iteration(1, "default")
    assert sorted(group.group_id for group in again.finished_groups) == [0, 1, 2] and rollout.next_group_id == 3
    assert again.new_groups == 3 and rollout.groups == []
    for trajectory in again.trajectories():
        assert trajectory.response_length == 40  # nothing lost or doubled
        before = kept.get((trajectory.group_id, trajectory.sample_index), [])  # (a group drawn only now: none)
        assert trajectory.response_ids[:len(before)] == before  # continued, not restarted


def test_repeat_detection_ends_a_looping_sample_at_the_next_segment_boundary(batched_engine):
    # Greedy decoding of this tiny model from prompt 2 repeats one token forever.
    repetition = RepetitionConfig(min_ngram=1, max_ngram=8, min_repeats=3, min_repeated_tokens=12, penalty=-1.0)
    settings = PartialRolloutSettings(samples_per_prompt=1, groups_per_iteration=1, max_new_tokens=64,
                                      segment_token_budget=8, max_iterations_per_trajectory=10)
    with RolloutMaster([batched_engine]) as master:
        group = Group.new(0, 2, encoded(2), 1, 1, lambda _: 64, seed_key=(0,))
        iterations = roll_out_until_finished(master, group, settings, batched_engine, repetition=repetition)
    batched_engine.update_weight_version("default")
    trajectory = group.trajectories[0]
    # 8 tokens are not yet a loop by this config (12 needed); 16 are: it ends there, not at 64.
    assert iterations == [1, 2] and trajectory.response_length == 16
    assert trajectory.finish_reason == "repeat" and trajectory.degenerate
    assert len(set(trajectory.response_ids)) == 1
