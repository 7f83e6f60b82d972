"""The durable replay buffer: the unfinished trajectories of partial rollouts, written at iteration boundaries.

After iteration i completes, `ReplayBuffer.save` writes `RUN_DIR/replay_buffer/iteration-<i:06d>.jsonl`
(a temporary file, fsynced, then renamed over: a crash leaves the old snapshot or the new one, never a
torn file) and deletes all but the `keep` newest snapshots. Every run checkpoint also carries the
snapshot of its iteration (`encode_state`, as run/replay_buffer.jsonl), and a resumed run restores
that one, so neither a pause (also `pause --now`, which keeps the interrupted rollout's trajectories)
nor a crash loses a partial trajectory: the rollout of iteration i+1 continues exactly what was
unfinished after iteration i, and draws new prompts where the sampler stood.

Format (JSON Lines, UTF-8; version 1):

  line 1, the header:
    {"format": "megatron-rl replay buffer", "version": 1,
     "iteration": i,                 the iteration after which it was written
     "next_group_id": n,             the id the next new group gets
     "sampler": {...},               data/sampler.py PromptSampler.state_dict(): epoch, position, seed, prompt_count
     "groups": g}                    how many group lines follow
  then one line per unfinished group (a prompt's k samples; some may be finished, waiting for the others):
    {"group_id": int, "prompt_index": int (in the run's prompt list), "prompt_id": str,
     "prompt_ids": [int] (the prompt's token ids, checked on load), "started_iteration": int,
     "trajectories": [{"sample_index": int, "max_new_tokens": int (its bound on response tokens),
                       "finish_reason": "stop" | "length" | "repeat" | null (null: unfinished),
                       "degenerate": bool,
                       "segments": [{"iteration": int, "weight_version": str,
                                     "token_ids": [int], "logprobs": [float | null]}]}]}

Log-probs are written with Python's shortest round-trip float repr, so they load back bit for bit;
null stands for a missing one (NaN).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from megatron_rl.atomic_file import atomic_text_file, fsync_directory
from megatron_rl.errors import UserError

FORMAT = "megatron-rl replay buffer"
VERSION = 1
_SNAPSHOT = re.compile(r"iteration-(\d{6,})\.jsonl")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentRecord(_Record):
    iteration: int = Field(ge=0)
    weight_version: str
    token_ids: list[int]
    logprobs: list[float | None]


class TrajectoryRecord(_Record):
    sample_index: int = Field(ge=0)
    max_new_tokens: int = Field(ge=1)
    finish_reason: Literal["stop", "length", "repeat"] | None
    degenerate: bool = False
    segments: list[SegmentRecord]


class GroupRecord(_Record):
    group_id: int = Field(ge=0)
    prompt_index: int = Field(ge=0)
    prompt_id: str
    prompt_ids: list[int]
    started_iteration: int = Field(ge=0)
    trajectories: list[TrajectoryRecord] = Field(min_length=1)


class BufferHeader(_Record):
    format: Literal["megatron-rl replay buffer"]
    version: Literal[1]
    iteration: int = Field(ge=0)
    next_group_id: int = Field(ge=0)
    sampler: dict
    groups: int = Field(ge=0)


@dataclass
class ReplayBufferState:
    """What one snapshot holds (see the module docstring)."""

    iteration: int
    next_group_id: int
    sampler: dict
    groups: list[GroupRecord] = field(default_factory=list)


class ReplayBuffer:
    """Snapshots in `directory`, one per saved iteration; the `keep` newest are kept."""

    def __init__(self, directory: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be ≥ 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path(self, iteration: int) -> Path:
        return self.directory / f"iteration-{iteration:06d}.jsonl"

    def iterations(self) -> list[int]:
        """The iterations with a snapshot, oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(int(match.group(1)) for match in map(_SNAPSHOT.fullmatch, os.listdir(self.directory)) if match)

    def save(self, state: ReplayBufferState) -> Path:
        """Write the snapshot of `state.iteration` atomically, then drop the older ones beyond `keep`."""
        target = self.path(state.iteration)
        with atomic_text_file(target) as file:
            file.write(encode_state(state).decode("utf-8"))
        fsync_directory(self.directory)
        for old in self.iterations()[: -self.keep]:
            self.path(old).unlink(missing_ok=True)
        return target

    def load(self, iteration: int | None = None) -> ReplayBufferState | None:
        """The snapshot after `iteration` (None: the newest); None when there is none at all.
        A damaged or foreign file raises UserError naming FILE:LINE."""
        if iteration is None:
            saved = self.iterations()
            if not saved:
                return None
            iteration = saved[-1]
        path = self.path(iteration)
        if not path.is_file():
            raise UserError(f"{path}: no replay buffer snapshot for iteration {iteration} (there are: "
                            f"{', '.join(map(str, self.iterations())) or 'none'}); resume from an iteration that has one")
        return decode_state(path.read_bytes(), str(path))


def encode_state(state: ReplayBufferState) -> bytes:
    """A snapshot's bytes (the format above)."""
    header = BufferHeader(format=FORMAT, version=VERSION, iteration=state.iteration,
                          next_group_id=state.next_group_id, sampler=state.sampler, groups=len(state.groups))
    lines = [json.dumps(record.model_dump(mode="json"), allow_nan=False, separators=(",", ":"))
             for record in (header, *state.groups)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def decode_state(raw: bytes, where: str) -> ReplayBufferState:
    """Parse a snapshot's bytes; `where` names them in errors (FILE:LINE)."""
    lines = raw.decode("utf-8").splitlines()
    if not lines:
        raise UserError(f"{where}: empty file; it is not a replay buffer snapshot (delete it to start afresh)")
    header = _parse(BufferHeader, lines[0], f"{where}:1")
    groups = [_parse(GroupRecord, line, f"{where}:{number}") for number, line in enumerate(lines[1:], start=2)]
    if len(groups) != header.groups:
        raise UserError(f"{where}: the header announces {header.groups} groups but {len(groups)} follow; the file "
                        "was cut short or edited")
    return ReplayBufferState(iteration=header.iteration, next_group_id=header.next_group_id,
                             sampler=header.sampler, groups=groups)


def _parse(model: type[BaseModel], line: str, where: str):
    try:
        return model.model_validate_json(line)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        field_name = ".".join(str(part) for part in first["loc"]) or "line"
        what = "header" if model is BufferHeader else "group line"
        raise UserError(f"{where}: not a valid replay buffer {what} ({field_name}: {first['msg']}); the snapshot "
                        "is damaged — resume from another iteration's snapshot") from None

