"""The durable replay buffer: snapshots round-trip bit for bit, are written atomically, damaged files are
named, and a run resumed from a snapshot loses no partial trajectory (real embedded engine, tiny model)."""
from __future__ import annotations

import json
import math

import pytest

from megatron_rl.data.formatting import EncodedPrompt
from megatron_rl.data.prompts import PromptRecord
from megatron_rl.data.sampler import PromptSampler
from megatron_rl.errors import UserError
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.engine_process import EmbeddedEngineProcess
from megatron_rl.rollout.master import RolloutMaster
from megatron_rl.rollout.partial import Group, PartialRollout, PartialRolloutSettings
from megatron_rl.rollout.protocol import SamplingParams
from megatron_rl.rollout.replay_buffer import GroupRecord, ReplayBuffer, ReplayBufferState
from tiny_models import write_tiny_hf_model

PROMPTS = [EncodedPrompt(PromptRecord(id=f"p{i}", prompt=f"prompt {i}", answer="0"),
                         [(11 * i + offset) % 120 + 3 for offset in range(4)]) for i in range(6)]
SAMPLING = SamplingParams(max_new_tokens=48, temperature=1.0, ignore_eos=True)
SETTINGS = PartialRolloutSettings(samples_per_prompt=2, groups_per_iteration=2, max_new_tokens=48,
                                  segment_token_budget=12, iteration_token_budget=30, max_iterations_per_trajectory=8)


def decode(token_ids: list[int]) -> str:
    return " ".join(map(str, token_ids))


def limits(group_id: int, sample_index: int) -> int:
    return 40 if sample_index == 0 and group_id % 2 == 0 else 3


def rollout_with_history() -> PartialRollout:
    """A rollout holding unfinished groups as an interrupted run would, without an engine: segments from
    two weight versions, a finished sample waiting for its sibling, awkward floats and a missing log-prob."""
    rollout = PartialRollout(None, PROMPTS, PromptSampler(len(PROMPTS), seed=5), SAMPLING, SETTINGS, decode,
                             trajectory_token_limit=limits)
    for _ in range(3):
        group = rollout._start_group(iteration=1)
        group.trajectories[0].extend(1, "0", [7, 8, 9], [-0.1, -1e-300, math.nan])
        group.trajectories[0].extend(2, "1", [10], [-2.220446049250313e-16])
        group.trajectories[1].extend(1, "0", [5, 6, 7], [-0.5, -0.25, -3.0])
        group.trajectories[1].finish_reason = "length"
        group.trajectories[1].response_text = decode(group.trajectories[1].response_ids)
        rollout.groups.append(group)
    return rollout


def same_groups(left: list[Group], right: list[Group]) -> bool:
    def view(group: Group):
        return (group.group_id, group.prompt_index, group.prompt, group.started_iteration, group.seed_key,
                [(t.sample_index, t.max_new_tokens, t.finish_reason, t.degenerate, t.response_text,
                  [(s.iteration, s.weight_version, s.token_ids, [repr(lp) for lp in s.logprobs]) for s in t.segments])
                 for t in group.trajectories])
    return [view(g) for g in left] == [view(g) for g in right]


def test_a_snapshot_restores_the_groups_and_the_sampler_bit_for_bit(tmp_path):
    original = rollout_with_history()
    buffer = ReplayBuffer(tmp_path / "replay_buffer")
    path = buffer.save(original.state(iteration=2))
    assert path.name == "iteration-000002.jsonl"
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["format"], header["version"], header["iteration"], header["groups"]) == (
        "megatron-rl replay buffer", 1, 2, 3)
    assert json.loads(lines[1])["trajectories"][0]["segments"][0]["logprobs"][2] is None  # NaN is written as null

    resumed = PartialRollout(None, PROMPTS, PromptSampler(len(PROMPTS), seed=5), SAMPLING, SETTINGS, decode,
                             trajectory_token_limit=limits)
    resumed.restore(buffer.load())
    assert same_groups(resumed.groups, original.groups)
    assert resumed.next_group_id == original.next_group_id == 3
    # The sampler goes on where it stood: the next prompts are those the original would draw.
    assert resumed.sampler.next_indices(5) == original.sampler.next_indices(5)


def test_saving_is_atomic_and_keeps_only_the_newest_snapshots(tmp_path):
    buffer = ReplayBuffer(tmp_path / "replay_buffer", keep=2)
    rollout = rollout_with_history()
    for iteration in (1, 2, 3):
        buffer.save(rollout.state(iteration))
    assert buffer.iterations() == [2, 3]
    before = buffer.path(3).read_bytes()
    broken = rollout.state(4)
    # A record that cannot be written (a token id that is no number) fails the save half-way through.
    broken.groups.append(GroupRecord.model_construct(**{**broken.groups[0].model_dump(), "prompt_ids": [object()]}))
    with pytest.raises(ValueError, match="Unable to serialize"):
        buffer.save(broken)
    assert buffer.iterations() == [2, 3] and buffer.path(3).read_bytes() == before
    assert sorted(p.name for p in buffer.directory.iterdir()) == ["iteration-000002.jsonl", "iteration-000003.jsonl"]


def test_a_damaged_or_missing_snapshot_is_a_clear_error(tmp_path):
    buffer = ReplayBuffer(tmp_path / "replay_buffer")
    assert buffer.load() is None
    path = buffer.save(rollout_with_history().state(4))
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1].replace('"token_ids":[7', '"token_ids":["x"'), *lines[2:]]) + "\n")
    with pytest.raises(UserError, match=rf"{path}:2: not a valid replay buffer group line .*token_ids"):
        buffer.load()
    path.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(UserError, match="announces 3 groups but 2 follow"):
        buffer.load(4)
    with pytest.raises(UserError, match="no replay buffer snapshot for iteration 7"):
        buffer.load(7)
    other_prompts = [EncodedPrompt(p.record, p.input_ids[::-1]) for p in PROMPTS]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="the prompts changed"):
        PartialRollout(None, other_prompts, PromptSampler(len(PROMPTS), seed=5), SAMPLING, SETTINGS,
                       decode).restore(buffer.load())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("buffer-engine")
    model = write_tiny_hf_model(root / "qwen3", "qwen3", seed=0)
    process = EmbeddedEngineProcess(model, root / "engine.log", load_format="auto", max_running_requests=3,
                                    extra_args=("--random-seed", "0"))
    process.start(timeout=120)
    yield EngineClient(process.url, timeout=60)
    process.stop()


def test_a_run_resumed_from_its_snapshot_loses_no_partial_trajectory(engine, tmp_path):
    buffer = ReplayBuffer(tmp_path / "replay_buffer")
    with RolloutMaster([engine]) as master:
        first = PartialRollout(master, PROMPTS, PromptSampler(len(PROMPTS), seed=5), SAMPLING, SETTINGS, decode,
                               seed=1, trajectory_token_limit=limits)
        first.run_iteration(1, "default")
        buffer.save(first.state(1))
        saved = {(g.group_id, t.sample_index): t.response_ids for g in first.groups for t in g.trajectories}
        assert any(0 < len(tokens) < limits(*key) for key, tokens in saved.items())  # partial trajectories saved
        first.run_iteration(2, "default")  # the "crashed" run went on; its iteration 2 is lost with it

        resumed = PartialRollout(master, PROMPTS, PromptSampler(len(PROMPTS), seed=5), SAMPLING, SETTINGS, decode,
                                 seed=1, trajectory_token_limit=limits)
        resumed.restore(buffer.load())
        finished = {}
        for iteration in range(2, 8):
            result = resumed.run_iteration(iteration, "default")
            finished.update({(g.group_id, t.sample_index): t for g in result.finished_groups for t in g.trajectories})
            if {key[0] for key in saved} <= {key[0] for key in finished}:
                break
    for key, tokens in saved.items():
        trajectory = finished[key]  # every saved trajectory finished, from where it had stopped
        assert trajectory.response_ids[: len(tokens)] == tokens and trajectory.response_length == limits(*key)
    # New groups take the ids after the snapshot's, and the prompts the sampler draws next: group g has the
    # g-th prompt drawn, as in a run that was never interrupted.
    snapshot_ids = buffer.load(1).next_group_id
    assert {key[0] for key in finished} - {key[0] for key in saved} and all(
        key[0] >= snapshot_ids for key in finished if key not in saved)
    drawn = PromptSampler(len(PROMPTS), seed=5).next_indices(resumed.next_group_id)
    assert all(trajectory.prompt is PROMPTS[drawn[group_id]] for (group_id, _), trajectory in finished.items())
