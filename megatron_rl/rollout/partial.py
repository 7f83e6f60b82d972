"""Partial rollouts (k1.5 §2.6.2): trajectories that span iterations, token budgets, group bookkeeping.

A `Trajectory` is one sample of a prompt, built from `Segment`s: the tokens (with the engine's log-probs)
generated in one iteration by one weight version. A `Group` holds a prompt's k trajectories; it is handed
to training only when all k are finished, since the mean-reward baseline (and the length penalty's
min/max) needs all of them.

One iteration (`run_iteration`), against a `RolloutMaster` that spreads requests over the engines:
- the unfinished trajectories of earlier iterations are continued first (request: prompt + their tokens
  so far), the oldest first; those at their staleness bound (`max_iterations_per_trajectory`: the
  iterations one trajectory may span) are generated to the end and never stopped;
- a request asks for at most `segment_token_budget` new tokens, the trajectory's budget per iteration;
  a trajectory that spends it unfinished waits for the next iteration;
- with `iteration_token_budget` unset, the iteration starts `groups_per_iteration` new groups and runs
  until every request has returned (with both budgets unset: synchronous full rollouts);
- with it set, new groups are started whenever an engine slot is free, until the iteration has generated
  that many output tokens and at least `groups_per_iteration` groups have finished; then every request
  still running is stopped (abort: the engine returns what it generated) and kept for the next
  iteration. The budget counts the tokens of returned requests.
- repeat detection (reward/repetition.py) runs on every returned segment: a looping trajectory is ended
  there (finish_reason "repeat", degenerate), instead of spending the rest of its budget;
- a request that fails (after the master's retries) drops its group, counted with its tokens as wasted;
  a stale weight version or no engine left fails the rollout;
- `interrupt` (an operator's `pause --now`, or an engine that came back without its pushed weights) stops
  every request at once; the iteration hands nothing to training and every group it touched, finished or
  not, stays for the next attempt (a request that fails once it is set is kept as it was, not dropped),
  whose budgets count the groups and tokens the interrupted attempt already drew and generated.

Training on a trajectory whose early segments came from older weights (`old_segment_loss`):
"mask" gives those tokens loss_mask 0 (they still condition the current segment and count for the
reward), "keep" trains on them too — the trainer recomputes every token's reference log-probs with
its current weights anyway (k1.5 §2.3.2), so keeping them needs nothing else. `rollout_logprobs` hold
the engine's log-probs of the current version's tokens only (NaN elsewhere): the trainer compares them
with its own on the same weights.

Sampling seeds derive from (seed, the group's `seed_key`, sample index, tokens so far), so a continued
trajectory draws fresh numbers at every continuation, and the same run samples the same tokens.

The unfinished groups and the prompt sampler's position are the state `replay_buffer.py` writes at
iteration boundaries; `state()` and `restore()` convert.
"""
from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from megatron_rl.data.formatting import EncodedPrompt
from megatron_rl.data.sampler import PromptSampler
from megatron_rl.reward.repetition import RepetitionConfig, RepetitionDetector
from megatron_rl.rollout.master import RolloutMaster
from megatron_rl.rollout.protocol import EngineError, GenerateRequest, SamplingParams
from megatron_rl.rollout.replay_buffer import GroupRecord, ReplayBufferState, SegmentRecord, TrajectoryRecord

logger = logging.getLogger(__name__)

OldSegmentLoss = Literal["mask", "keep"]
INTERRUPT_POLL_S = 0.2  # how often a running iteration looks at its interrupt
TrajectoryFinish = Literal["stop", "length", "repeat"]


def request_seed(base_seed: int, *key: int) -> int:
    """A per-request sampling seed (63 bits, as SGLang accepts) from the seed and the request's key."""
    digest = hashlib.sha256(":".join(str(part) for part in (base_seed, *key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class Segment:
    """Tokens one weight version generated for a trajectory in one iteration."""

    iteration: int
    weight_version: str
    token_ids: list[int]
    logprobs: list[float]  # the engine's, one per token (NaN where it gave none)


@dataclass
class Trajectory:
    """One sample of a prompt, possibly generated over several iterations."""

    prompt: EncodedPrompt
    group_id: int
    sample_index: int  # which of the prompt's samples (0 .. samples_per_prompt-1)
    max_new_tokens: int  # its bound on response tokens, over all segments
    started_iteration: int
    segments: list[Segment] = field(default_factory=list)
    finish_reason: TrajectoryFinish | None = None  # None while unfinished
    degenerate: bool = False  # its tail loops (reward/repetition.py)
    response_text: str = ""  # set when it finishes

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def response_ids(self) -> list[int]:
        return [token for segment in self.segments for token in segment.token_ids]

    @property
    def response_logprobs(self) -> list[float]:
        return [logprob for segment in self.segments for logprob in segment.logprobs]

    @property
    def response_length(self) -> int:
        return sum(len(segment.token_ids) for segment in self.segments)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt.input_ids + self.response_ids

    @property
    def weight_version(self) -> str:
        """The version of its last segment ("" before it has one)."""
        return self.segments[-1].weight_version if self.segments else ""

    @property
    def weight_versions(self) -> list[str]:
        return [segment.weight_version for segment in self.segments]

    def tokens_in(self, iteration: int) -> int:
        return sum(len(segment.token_ids) for segment in self.segments if segment.iteration == iteration)

    def extend(self, iteration: int, weight_version: str, token_ids: list[int], logprobs: list[float]) -> None:
        """Add tokens; those of the same iteration and version as the last segment join it."""
        last = self.segments[-1] if self.segments else None
        if last is not None and (last.iteration, last.weight_version) == (iteration, weight_version):
            last.token_ids.extend(token_ids)
            last.logprobs.extend(logprobs)
        else:
            self.segments.append(Segment(iteration, weight_version, list(token_ids), list(logprobs)))

    def loss_mask(self, weight_version: str, old_segment_loss: OldSegmentLoss) -> list[float]:
        """Aligned with token_ids: 0 on the prompt, 1 on trained response tokens. Tokens of segments from
        another version than `weight_version` (the trainer's) are trained only with "keep"."""
        mask = [0.0] * len(self.prompt.input_ids)
        for segment in self.segments:
            trained = old_segment_loss == "keep" or segment.weight_version == weight_version
            mask.extend([1.0 if trained else 0.0] * len(segment.token_ids))
        return mask

    def rollout_logprobs(self, weight_version: str) -> list[float]:
        """Aligned with token_ids: the engine's log-probs of the tokens `weight_version` generated, NaN elsewhere."""
        values = [math.nan] * len(self.prompt.input_ids)
        for segment in self.segments:
            values.extend(segment.logprobs if segment.weight_version == weight_version
                          else [math.nan] * len(segment.token_ids))
        return values


@dataclass
class Group:
    """A prompt's samples: rewarded and baselined together once every one is finished."""

    group_id: int
    prompt_index: int  # in the prompt list it was drawn from
    prompt: EncodedPrompt
    started_iteration: int
    trajectories: list[Trajectory]
    seed_key: tuple[int, ...]  # what its sampling seeds derive from (module docstring)
    failed: bool = False  # a request of it failed: dropped

    @property
    def finished(self) -> bool:
        return all(trajectory.finished for trajectory in self.trajectories)

    @property
    def output_tokens(self) -> int:
        return sum(trajectory.response_length for trajectory in self.trajectories)

    @classmethod
    def new(cls, group_id: int, prompt_index: int, prompt: EncodedPrompt, iteration: int, samples: int,
            max_new_tokens: Callable[[int], int], seed_key: tuple[int, ...]) -> Group:
        trajectories = [Trajectory(prompt, group_id, index, max_new_tokens(index), iteration) for index in range(samples)]
        return cls(group_id, prompt_index, prompt, iteration, trajectories, seed_key)


@dataclass(frozen=True)
class PartialRolloutSettings:
    """See the module docstring. Both budgets unset: synchronous full rollouts."""

    samples_per_prompt: int
    groups_per_iteration: int
    max_new_tokens: int
    segment_token_budget: int | None = None
    iteration_token_budget: int | None = None
    max_iterations_per_trajectory: int = 4
    old_segment_loss: OldSegmentLoss = "mask"

    def __post_init__(self) -> None:
        for name in ("samples_per_prompt", "groups_per_iteration", "max_new_tokens", "max_iterations_per_trajectory"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("segment_token_budget", "iteration_token_budget"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be ≥ 1 or unset, got {value}")
        if self.old_segment_loss not in ("mask", "keep"):
            raise ValueError(f"old_segment_loss must be 'mask' or 'keep', got {self.old_segment_loss!r}")


@dataclass
class IterationResult:
    iteration: int
    weight_version: str
    finished_groups: list[Group]  # every trajectory finished: ready for rewards and training
    failed_groups: list[Group]  # dropped after a failed request
    new_groups: int  # started in this iteration
    continued_trajectories: int  # unfinished ones it took over from earlier iterations
    output_tokens: int  # generated in this iteration, by any trajectory
    carried_over_tokens: int  # of those, the ones in trajectories left unfinished (they go on next iteration)
    wasted_tokens: int  # of the failed groups, all iterations' (thrown away)
    stopped_requests: int  # running when the iteration's budget was spent
    resent_tokens: int  # response tokens sent again as input to continue trajectories (prefilled again)
    failed_requests: int
    seconds: float
    busy_fraction: float  # of the engines' slot time, in use during the iteration
    errors: list[str] = field(default_factory=list)  # the first few failure messages
    interrupted: bool = False  # `interrupt` was set: every request stopped, unfinished groups kept

    def trajectories(self) -> list[Trajectory]:
        """The finished groups' trajectories, by group and sample index."""
        return [t for group in sorted(self.finished_groups, key=lambda g: g.group_id) for t in group.trajectories]


class _Iteration:
    """One iteration's rollout over `groups` (continued) and the groups `start_group` creates."""

    def __init__(self, master: RolloutMaster, iteration: int, weight_version: str, sampling: SamplingParams,
                 settings: PartialRolloutSettings, groups: list[Group], start_group: Callable[[], Group] | None,
                 decode: Callable[[list[int]], str], seed: int | None, repetition: RepetitionConfig | None,
                 on_trajectory_done: Callable[[Trajectory], None] | None,
                 on_group_done: Callable[[Group], None] | None, interrupt: threading.Event | None = None):
        self.master = master
        self.interrupt = interrupt
        self.interrupted = False
        self.iteration = iteration
        self.weight_version = weight_version
        self.sampling = sampling
        self.settings = settings
        self.groups = groups
        self.start_group = start_group
        self.decode = decode
        self.seed = seed
        self.detector = RepetitionDetector(repetition) if repetition is not None and repetition.enabled else None
        self.on_trajectory_done = on_trajectory_done
        self.on_group_done = on_group_done
        self.groups_by_id = {group.group_id: group for group in groups}
        self.finished_groups: list[Group] = []
        self.failed_groups: list[Group] = []
        # What an earlier, interrupted attempt at this iteration drew and generated counts against its budgets.
        self.new_groups = sum(group.started_iteration == iteration for group in groups)
        self.earlier_attempt_tokens = sum(t.tokens_in(iteration) for group in groups for t in group.trajectories)
        self.output_tokens = 0
        self.stopped_requests = 0
        self.resent_tokens = 0
        self.failed_requests = 0
        self.errors: list[str] = []
        self.stopping = False

    def must_finish(self, trajectory: Trajectory) -> bool:
        return self.iteration - trajectory.started_iteration + 1 >= self.settings.max_iterations_per_trajectory

    def run(self) -> IterationResult:
        started, busy_before = time.monotonic(), self.master.busy_slot_seconds()
        # Groups whose samples all finished before an interruption (pause --now) go to training now.
        self.finished_groups.extend(group for group in self.groups if group.finished and not group.failed)
        queue = deque(sorted((t for group in self.groups for t in group.trajectories if not t.finished),
                             key=lambda t: (not self.must_finish(t), t.started_iteration, t.group_id, t.sample_index)))
        continued = len(queue)
        in_flight: dict[Future, Trajectory] = {}
        try:
            while True:
                self._fill(queue, in_flight)
                if not in_flight:
                    break
                done, _ = wait(list(in_flight), timeout=INTERRUPT_POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    self._take(future, in_flight.pop(future), queue)
                if not self.interrupted and self.interrupt is not None and self.interrupt.is_set():
                    self.interrupted = self.stopping = True  # everything stops, what must finish too
                    self.stopped_requests += len(in_flight)
                    self.master.abort(list(in_flight))
                elif not self.stopping and self._budget_spent():
                    self.stopping = True
                    stop = [future for future, t in in_flight.items() if not self.must_finish(t)]
                    self.stopped_requests += len(stop)
                    self.master.abort(stop)
        except BaseException:
            self.master.abort(list(in_flight))  # the rollout is over: nobody waits for these any more
            raise
        seconds = time.monotonic() - started
        left = [t for group in self.groups if not group.finished and not group.failed for t in group.trajectories]
        return IterationResult(
            iteration=self.iteration, weight_version=self.weight_version, finished_groups=self.finished_groups,
            failed_groups=self.failed_groups, new_groups=self.new_groups, continued_trajectories=continued,
            output_tokens=self.output_tokens,
            carried_over_tokens=sum(t.tokens_in(self.iteration) for t in left if not t.finished),
            wasted_tokens=sum(group.output_tokens for group in self.failed_groups),
            stopped_requests=self.stopped_requests, resent_tokens=self.resent_tokens,
            failed_requests=self.failed_requests, seconds=seconds,
            busy_fraction=self.master.busy_fraction(busy_before, seconds), errors=self.errors[:3],
            interrupted=self.interrupted)

    # --- what to send ------------------------------------------------------------------------------

    def _budget_spent(self) -> bool:
        budget = self.settings.iteration_token_budget
        return (budget is not None and self.earlier_attempt_tokens + self.output_tokens >= budget
                and len(self.finished_groups) >= self.settings.groups_per_iteration)

    def _may_start_group(self) -> bool:
        if self.start_group is None or self.stopping:
            return False
        if self.settings.iteration_token_budget is None:
            return self.new_groups < self.settings.groups_per_iteration
        # Keep every slot busy until the budget is spent and the trainer has its groups — unless the engines
        # fail what they get: after as many failed groups as the iteration needs, no new ones are drawn.
        return len(self.failed_groups) < self.settings.groups_per_iteration

    def _next(self, queue: deque[Trajectory]) -> Trajectory | None:
        while queue:
            if self.interrupted:
                return None
            if self.stopping:  # only what must finish in this iteration is still sent
                trajectory = next((t for t in queue if self.must_finish(t)), None)
                if trajectory is None:
                    return None
                queue.remove(trajectory)
            else:
                trajectory = queue.popleft()
            if not self.groups_by_id[trajectory.group_id].failed:
                return trajectory
        return None

    def _fill(self, queue: deque[Trajectory], in_flight: dict[Future, Trajectory]) -> None:
        capacity = self.master.capacity
        while len(in_flight) < capacity:
            trajectory = self._next(queue)
            if trajectory is None:
                if not self._may_start_group():
                    return
                group = self.start_group()
                self.new_groups += 1
                self.groups.append(group)
                self.groups_by_id[group.group_id] = group
                queue.extend(group.trajectories)
                continue
            in_flight[self._send(trajectory)] = trajectory

    def _send(self, trajectory: Trajectory) -> Future:
        generated = trajectory.response_length
        self.resent_tokens += generated
        new_tokens = trajectory.max_new_tokens - generated
        budget = self.settings.segment_token_budget
        if budget is not None and not self.must_finish(trajectory):
            new_tokens = min(new_tokens, budget - trajectory.tokens_in(self.iteration))
        update: dict = {"max_new_tokens": new_tokens,
                        "min_new_tokens": max(0, self.sampling.min_new_tokens - generated)}
        if self.seed is not None:
            group = self.groups_by_id[trajectory.group_id]
            key = (*group.seed_key, trajectory.sample_index) + ((generated,) if generated else ())
            update["sampling_seed"] = request_seed(self.seed, *key)
        request = GenerateRequest(input_ids=trajectory.token_ids, sampling_params=self.sampling.model_copy(update=update))
        return self.master.submit(request, self.weight_version)

    # --- what came back ----------------------------------------------------------------------------

    def _take(self, future: Future, trajectory: Trajectory, queue: deque[Trajectory]) -> None:
        group = self.groups_by_id[trajectory.group_id]
        try:
            completed = future.result()
        except EngineError as error:  # this request failed for good (the master retried): drop its group
            if self.interrupt is not None and self.interrupt.is_set():
                return  # failed as the iteration is interrupted (the engine that lost its weights): kept, unchanged
            self.failed_requests += 1
            self.errors.append(str(error))
            if not group.failed:
                group.failed = True
                self.failed_groups.append(group)
                logger.warning("iteration %d: group %d dropped after a failed request: %s", self.iteration,
                               group.group_id, error)
            return
        result = completed.result
        new_tokens = result.output_ids
        self.output_tokens += len(new_tokens)
        if new_tokens:
            logprobs = result.output_logprobs or [math.nan] * len(new_tokens)
            trajectory.extend(self.iteration, self.weight_version, new_tokens, logprobs)
        if group.failed:
            return
        if result.finish_reason == "stop" or trajectory.response_length >= trajectory.max_new_tokens:
            self._finish(trajectory, group, "stop" if result.finish_reason == "stop" else "length")
        elif new_tokens and self.detector is not None and self.detector.is_degenerate(trajectory.response_ids):
            self._finish(trajectory, group, "repeat")
        elif self.stopping and result.finish_reason == "abort" and (self.interrupted or not self.must_finish(trajectory)):
            pass  # stopped at the iteration's end (or interrupted): continued next iteration
        elif (self.settings.segment_token_budget is not None and not self.must_finish(trajectory)
              and trajectory.tokens_in(self.iteration) >= self.settings.segment_token_budget):
            pass  # its budget for this iteration is spent: continued next iteration
        else:
            queue.appendleft(trajectory)  # stopped early by the engine (an abort not ours): go on now

    def _finish(self, trajectory: Trajectory, group: Group, reason: TrajectoryFinish) -> None:
        trajectory.finish_reason = reason
        trajectory.degenerate = reason == "repeat" or (
            self.detector is not None and self.detector.is_degenerate(trajectory.response_ids))
        trajectory.response_text = self.decode(trajectory.response_ids)
        if self.on_trajectory_done is not None:
            self.on_trajectory_done(trajectory)
        if group.finished:
            self.finished_groups.append(group)
            if self.on_group_done is not None:
                self.on_group_done(group)


def run_groups(master: RolloutMaster, groups: list[Group], iteration: int, weight_version: str,
               sampling: SamplingParams, settings: PartialRolloutSettings, decode: Callable[[list[int]], str], *,
               start_group: Callable[[], Group] | None = None, seed: int | None = None,
               repetition: RepetitionConfig | None = None,
               on_trajectory_done: Callable[[Trajectory], None] | None = None,
               on_group_done: Callable[[Group], None] | None = None,
               interrupt: threading.Event | None = None) -> IterationResult:
    """One iteration's rollout: continue `groups`, start new ones with `start_group` (module docstring).
    `groups` is extended with the groups started. Once `interrupt` is set, every request is stopped and
    the iteration ends with what it has (`interrupted`)."""
    return _Iteration(master, iteration, weight_version, sampling, settings, groups, start_group, decode, seed,
                      repetition, on_trajectory_done, on_group_done, interrupt).run()


class PartialRollout:
    """Iteration after iteration of partial rollouts over `prompts`, drawn by `sampler`; it holds the
    unfinished groups (the replay buffer's content) between iterations.

    `trajectory_token_limit(group_id, sample_index)`: a trajectory's own bound on response tokens
    (≤ settings.max_new_tokens, which applies when it is unset).
    """

    def __init__(self, master: RolloutMaster, prompts: Sequence[EncodedPrompt], sampler: PromptSampler,
                 sampling: SamplingParams, settings: PartialRolloutSettings, decode: Callable[[list[int]], str], *,
                 seed: int | None = None, repetition: RepetitionConfig | None = None,
                 trajectory_token_limit: Callable[[int, int], int] | None = None):
        self.master = master
        self.prompts = prompts
        self.sampler = sampler
        self.sampling = sampling
        self.settings = settings
        self.decode = decode
        self.seed = seed
        self.repetition = repetition
        self.trajectory_token_limit = trajectory_token_limit
        self.groups: list[Group] = []  # unfinished, oldest first
        self.next_group_id = 0

    @property
    def buffered_tokens(self) -> int:
        """Tokens held by the unfinished groups."""
        return sum(group.output_tokens for group in self.groups)

    def _token_limit(self, group_id: int, sample_index: int) -> int:
        if self.trajectory_token_limit is None:
            return self.settings.max_new_tokens
        return min(self.trajectory_token_limit(group_id, sample_index), self.settings.max_new_tokens)

    def _start_group(self, iteration: int) -> Group:
        prompt_index = self.sampler.next_indices(1)[0]
        group_id = self.next_group_id
        self.next_group_id += 1
        return Group.new(group_id, prompt_index, self.prompts[prompt_index], iteration, self.settings.samples_per_prompt,
                         lambda sample_index: self._token_limit(group_id, sample_index), seed_key=(group_id,))

    def run_iteration(self, iteration: int, weight_version: str, *,
                      on_trajectory_done: Callable[[Trajectory], None] | None = None,
                      on_group_done: Callable[[Group], None] | None = None,
                      interrupt: threading.Event | None = None) -> IterationResult:
        """Roll out `iteration` with the engines at `weight_version`; the finished groups are in the result.
        Interrupted (`interrupt` set), nothing is handed out: every group drawn stays for the next attempt."""
        groups = list(self.groups)
        result = None
        try:
            result = run_groups(self.master, groups, iteration, weight_version, self.sampling, self.settings,
                                self.decode, start_group=lambda: self._start_group(iteration), seed=self.seed,
                                repetition=self.repetition, on_trajectory_done=on_trajectory_done,
                                on_group_done=on_group_done, interrupt=interrupt)
            return result
        finally:
            # Also after a failure: what was generated stays, and the groups already drawn are not lost.
            interrupted = result is not None and result.interrupted
            self.groups = [group for group in groups if (interrupted or not group.finished) and not group.failed]

    # --- the replay buffer's state -----------------------------------------------------------------

    def state(self, iteration: int) -> ReplayBufferState:
        """What must survive a restart after `iteration`: the unfinished groups and the sampler's position."""
        return ReplayBufferState(
            iteration=iteration, next_group_id=self.next_group_id, sampler=self.sampler.state_dict(),
            groups=[_group_record(group) for group in self.groups])

    def restore(self, state: ReplayBufferState) -> None:
        """Continue from `state` (saved by `state()` for the same prompts); raises ValueError if it does not fit."""
        self.sampler.load_state_dict(state.sampler)
        groups = []
        for record in state.groups:
            if not 0 <= record.prompt_index < len(self.prompts):
                raise ValueError(f"group {record.group_id}: prompt index {record.prompt_index} is not among the "
                                 f"{len(self.prompts)} prompts")
            prompt = self.prompts[record.prompt_index]
            if prompt.input_ids != record.prompt_ids or prompt.record.id != record.prompt_id:
                raise ValueError(f"group {record.group_id}: prompt {record.prompt_index} is '{prompt.record.id}' with "
                                 f"other tokens than the saved '{record.prompt_id}': the prompts changed")
            groups.append(self._group_from_record(record, prompt))
        self.groups = groups
        self.next_group_id = state.next_group_id

    def _group_from_record(self, record: GroupRecord, prompt: EncodedPrompt) -> Group:
        trajectories = []
        for saved in record.trajectories:
            trajectory = Trajectory(prompt, record.group_id, saved.sample_index, saved.max_new_tokens,
                                    record.started_iteration, finish_reason=saved.finish_reason,
                                    degenerate=saved.degenerate)
            trajectory.segments = [Segment(s.iteration, s.weight_version, list(s.token_ids),
                                           [math.nan if lp is None else lp for lp in s.logprobs])
                                   for s in saved.segments]
            if trajectory.finished:
                trajectory.response_text = self.decode(trajectory.response_ids)
            trajectories.append(trajectory)
        return Group(record.group_id, record.prompt_index, prompt, record.started_iteration, trajectories,
                     seed_key=(record.group_id,))


def _group_record(group: Group) -> GroupRecord:
    return GroupRecord(
        group_id=group.group_id, prompt_index=group.prompt_index, prompt_id=group.prompt.record.id,
        prompt_ids=group.prompt.input_ids, started_iteration=group.started_iteration,
        trajectories=[TrajectoryRecord(
            sample_index=t.sample_index, max_new_tokens=t.max_new_tokens, finish_reason=t.finish_reason,
            degenerate=t.degenerate,
            segments=[SegmentRecord(iteration=s.iteration, weight_version=s.weight_version, token_ids=s.token_ids,
                                    logprobs=[None if math.isnan(lp) else lp for lp in s.logprobs])
                      for s in t.segments])
            for t in group.trajectories])
