"""The driver: rank 0's side of the RL loop — the engine, prompts, rollouts, rewards, evaluation and logs.

Trainer ranks only train and write weights; everything that talks to the engine or writes the run's
records happens here, and what the trainer needs from it (the TrainBatch) reaches every rank through
`rl_loop.on_driver`.
"""
from __future__ import annotations

import base64
import logging
import math
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from megatron_rl import algo
from megatron_rl.config import Config
from megatron_rl.data.formatting import EncodedPrompt, encode_prompts, load_tokenizer
from megatron_rl.data.prompts import PromptRecord, load_prompts
from megatron_rl.data.sampler import make_sampler
from megatron_rl.data.synthetic import synthetic_prompt_sets
from megatron_rl.control.operations import EngineSummary, IterationSummary, RunControl, RunOperation, RunStatus
from megatron_rl.control.store import store_from_config
from megatron_rl.errors import RunError, UserError
from megatron_rl.hybrid.engine_control import EngineGroup
from megatron_rl.hybrid.phases import FINAL_PHASES, PhaseOrchestrator
from megatron_rl.hybrid.sidecar_protocol import load_sidecar_token
from megatron_rl.hybrid.swap_guard import ProbeReference, SwapCheck, check_engine, probe_sequences
from megatron_rl.hybrid.weight_sync import EnginesLostWeights, SyncedWeights, register_weights, weights_prefix
from megatron_rl.metrics import ConsoleTable, MetricsLog, append_json_line, set_aside_after
from megatron_rl.reward.batch import RewardBackends, RewardRequest, RewardResult, math_worker_pool, score_batch
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.generation import RolloutFailed, RolloutResult, Sample, StaleWeightsError, generate_samples
from megatron_rl.rollout.master import RolloutMaster
from megatron_rl.rollout.partial import IterationResult, PartialRollout, PartialRolloutSettings
from megatron_rl.rollout.protocol import EngineLostWeights, SamplingParams
from megatron_rl.rollout.replay_buffer import ReplayBuffer, decode_state, encode_state
from megatron_rl.train.checkpoint import RunCheckpoints, read_run_file
from megatron_rl.train.offload import OffloadResult
from megatron_rl.train.trainer import TrainBatch

logger = logging.getLogger(__name__)

DRIVER_STATE_FILE = "driver.json"
REPLAY_BUFFER_FILE = "replay_buffer.jsonl"  # rollout/replay_buffer.py's format
RECENT_ITERATIONS = 10
PAUSE_NOW_POLL_S = 0.5  # how often a rollout looks for an operator's `pause --now`


class DriverState(BaseModel):
    """The driver's part of a run checkpoint (run/driver.json in it)."""

    iteration: int
    sampler: dict
    evaluations: list[dict]
    recent: list[IterationSummary]
    python_rng: list
    torch_rng: str  # base64 of torch.get_rng_state()


def load_prompt_sets(config: Config) -> tuple[list[PromptRecord], list[PromptRecord], str]:
    """(train, eval, where they come from) from data.prompts / data.eval_prompts or data.synthetic."""
    data = config.data
    if data.prompts is not None:
        eval_records = load_prompts(data.eval_prompts) if data.eval_prompts else []
        return load_prompts(data.prompts), eval_records, data.prompts
    if data.synthetic is not None:
        train, held_out = synthetic_prompt_sets(data.synthetic)
        return train, held_out, f"synthetic {data.synthetic.task} prompts"
    raise UserError("no prompts: set data.prompts (a JSONL file) or data.synthetic (a generated task)")


def percentile(values: list[float], fraction: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), fraction)) if values else math.nan


class Driver:
    def __init__(self, config: Config, run_dir: Path, model_dir: Path, context_length: int):
        self._started = time.monotonic()
        self.config = config
        self.run_dir = run_dir
        self.console = Console(highlight=False, soft_wrap=True)  # table rows stay whole lines in logs too
        self.tokenizer = load_tokenizer(model_dir)
        train_records, eval_records, source = load_prompt_sets(config)
        max_prompt_tokens = context_length - config.rollout.max_new_tokens
        if max_prompt_tokens < 1:
            raise UserError(f"rollout.max_new_tokens={config.rollout.max_new_tokens} leaves no room for a prompt in "
                            f"the {context_length}-token context; lower it")
        template, system = config.data.apply_chat_template, config.data.system_prompt
        self.train_prompts = encode_prompts(train_records, self.tokenizer, template, max_prompt_tokens, source, system)
        self.eval_prompts = (encode_prompts(eval_records[: config.eval.max_prompts], self.tokenizer, template,
                                            max_prompt_tokens, source + " (eval)", system) if eval_records else [])
        self.sampler = make_sampler(config.data, [prompt.record for prompt in self.train_prompts])
        # The swap guard's probe sequences (none when it is off): the same after every sync.
        self.swap_probes = (probe_sequences([prompt.input_ids for prompt in self.train_prompts],
                                            config.hybrid.swap_guard_probes) if config.hybrid.swap_guard else [])
        self.metrics = MetricsLog(run_dir, config.logging.tensorboard)
        self.table = ConsoleTable(self.console)
        self.rollouts_dir = run_dir / "rollouts"
        self.rollouts_dir.mkdir(exist_ok=True)
        self.reward_pool = math_worker_pool(config.reward.workers) if config.reward.workers > 0 else None
        self.reward_backends = RewardBackends.connect(sandbox_url=config.reward.sandbox_url, judge=config.reward.judge,
                                                      code_concurrency=config.reward.code_concurrency)
        self._last_rollout_stats: dict = {}
        self._swap_check: SwapCheck | None = None
        self._evaluations: list[dict] = []
        self.store = store_from_config(config.control)
        # Operators reach an etcd run through etcd, an embedded one through its directory.
        self.run_control = RunControl(run_dir, config.control.run_name,
                                      self.store if config.control.store == "etcd" else None)
        self._recent: list[IterationSummary] = []
        self._last_checkpoint: str | None = None
        self.phases = PhaseOrchestrator(self.store, config.control.run_name,
                                        driver_lease_ttl_s=config.control.driver_lease_ttl_s)
        self.phases.start()
        self.engines = EngineGroup.from_config(config, run_dir, self.store)
        self.engines.wait_ready()
        # Requests spread over the engines; a lost engine's requests go to the others, and when none is up
        # its sidecar's restart is waited for (it comes back with the same weights, or without pushed ones).
        self._rollout_interrupt: threading.Event | None = None  # the rollout in progress stops when it is set
        self._engine_lost_weights = False
        api_key = load_sidecar_token(config.hybrid)  # engines beyond loopback ask for it
        self.master = RolloutMaster([EngineClient(url, timeout=config.rollout.request_timeout_s, api_key=api_key)
                                     for url in self.engines.engine_urls],
                                    request_timeout=config.rollout.request_timeout_s, recover=self._recover_engine)
        self.partial_rollout = self._partial_rollout()
        self.replay_buffer = ReplayBuffer(run_dir / "replay_buffer")
        self.publish_status("running", 0, None)
        logs = self.engines.engine_logs
        engine_log = f" (log: {', '.join(map(str, logs))})" if logs else ""
        engines = "engine" if len(self.master.engines) == 1 else f"{len(self.master.engines)} engines"
        self.console.print(f"driver: {len(self.train_prompts)} training prompts, {len(self.eval_prompts)} held-out, "
                           f"{engines} at {', '.join(self.engines.engine_urls)}{engine_log}, run directory {run_dir}")

    # --- phases and the engine's lifecycle ------------------------------------------------------------

    def enter_phase(self, phase: str, iteration: int, weight_version: str | None) -> None:
        self.phases.enter(phase, iteration, weight_version)

    def release_engine(self) -> None:
        self.engines.release()

    def prepare_engine_for_weights(self) -> None:
        self.engines.prepare_for_weights()

    def _recover_engine(self, client: EngineClient, weight_version: str | None) -> None:
        """No engine is up: wait for this one's restart. One back without its pushed weights interrupts the
        rollout (its trajectories are kept) so that the loop pushes them again."""
        try:
            self.engines.recover(client.base_url, weight_version)
        except EngineLostWeights as lost:
            logger.warning("%s; interrupting the rollout to push it again", lost)
            self._engine_lost_weights = True
            if self._rollout_interrupt is not None:
                self._rollout_interrupt.set()  # before the master fails the waiting requests with this error
            raise

    def load_weights(self, weights: SyncedWeights, probe_reference: ProbeReference | None) -> None:
        """Every engine loads (or records) the synced version and gets the rest of its memory back, and the
        swap guard checks each scores the probes as the trainer does (the worst one is reported). Engines the
        rollout master set aside (restarted without pushed weights) serve again from here."""
        if weights.path is not None:  # written to shared memory: its shards go on record first
            register_weights(self.store, self.config.control.run_name, weights)
        self.engines.load(weights)
        self.engines.resume(weights.weight_version)
        self.master.weights_synced(weights.weight_version)
        if probe_reference is not None:
            checks = [check_engine(engine, self.swap_probes, probe_reference, weights.weight_version,
                                   self.config.hybrid.swap_guard_threshold) for engine in self.master.engines]
            engine_seconds = sum(check.seconds - probe_reference.seconds for check in checks)
            self._swap_check = replace(max(checks, key=lambda check: check.max_gap),
                                       seconds=probe_reference.seconds + engine_seconds)

    def close(self) -> None:
        self.master.close()
        current = self.phases.current
        try:
            if current is not None and current.phase not in FINAL_PHASES:
                self.phases.enter("failed", current.iteration, current.weight_version)
                self.publish_status("failed", current.iteration, current.weight_version,
                                    message="the run stopped on an error; its log says why. Continue it from its last "
                                            f"checkpoint with: megatron-rl runs resume {self.run_dir}")
        except Exception as error:  # closing must go on: the engine is stopped next
            logger.warning("could not mark the run failed in the metadata store: %s", error)
        try:  # the shared-memory weights go with the run (DiskWeightSync.close), and so do their records
            self.store.delete_prefix(weights_prefix(self.config.control.run_name))
        except Exception as error:  # a later run of the same name replaces them
            logger.warning("could not remove the run's weight records from the metadata store: %s", error)
        self.phases.close()
        self.engines.close()
        if self.reward_pool is not None:
            self.reward_pool.shutdown(cancel_futures=True)
        self.metrics.close()
        self.store.close()

    # --- rollout and reward ------------------------------------------------------------------------

    @contextmanager
    def _progress(self, description: str, total: int):
        # Off a terminal (CI, `| tee`) a live bar only leaves blank lines between the table's rows.
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True, disable=not self.console.is_terminal) as progress:
            task = progress.add_task(description, total=total)
            yield lambda: progress.advance(task)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _partial_rollout(self) -> PartialRollout:
        rollout = self.config.rollout
        sampling = SamplingParams(max_new_tokens=rollout.max_new_tokens, temperature=rollout.temperature,
                                  top_p=rollout.top_p, top_k=rollout.top_k)
        partial = rollout.partial
        settings = PartialRolloutSettings(
            samples_per_prompt=rollout.samples_per_prompt, groups_per_iteration=self.config.data.prompts_per_iteration,
            max_new_tokens=rollout.max_new_tokens, segment_token_budget=partial.segment_token_budget,
            iteration_token_budget=partial.iteration_token_budget,
            max_iterations_per_trajectory=partial.max_iterations_per_trajectory,
            old_segment_loss=partial.old_segment_loss)
        return PartialRollout(self.master, self.train_prompts, self.sampler, sampling, settings, self._decode,
                              seed=rollout.seed if rollout.temperature > 0 else None,
                              repetition=self.config.reward.repetition)

    def _generate(self, prompts: list[EncodedPrompt], samples_per_prompt: int, sampling: SamplingParams,
                  weight_version: str, iteration: int, description: str) -> RolloutResult:
        rollout = self.config.rollout
        seed = rollout.seed if sampling.temperature > 0 else None
        with self._progress(description, len(prompts) * samples_per_prompt) as advance:
            try:
                return generate_samples(self.master, prompts, samples_per_prompt, sampling, weight_version, self._decode,
                                        seed=seed, iteration=iteration, repetition=self.config.reward.repetition,
                                        on_sample_done=advance)
            except (RolloutFailed, StaleWeightsError) as error:
                raise RunError(str(error)) from None

    def _score(self, samples: list[Sample], tag: str) -> list[RewardResult]:
        requests = [RewardRequest(sample_id=f"{tag}-{sample.group_id}-{index}", response_text=sample.response_text,
                                  reference_answer=sample.prompt.record.answer, task_type=sample.prompt.record.type,
                                  question=sample.prompt.record.question_text(), degenerate=sample.degenerate)
                    for index, sample in enumerate(samples)]
        return score_batch(requests, workers=1, degenerate_penalty=self.config.reward.repetition.penalty,
                           executor=self.reward_pool, backends=self.reward_backends)

    @contextmanager
    def _pause_now_watch(self):
        """An event set as soon as an operator asks for `pause --now` (or `stop --now`) during the rollout (and
        by `_recover_engine`)."""
        requested, finished = threading.Event(), threading.Event()

        def watch() -> None:
            while not finished.wait(PAUSE_NOW_POLL_S):
                try:
                    operation = self.run_control.pending_operation()
                except Exception as error:  # the store's trouble shows at the iteration boundary; keep rolling out
                    logger.warning("could not look for operator requests: %s", error)
                    continue
                if operation is not None and operation.now:
                    requested.set()
                    return

        watcher = threading.Thread(target=watch, name="pause-now-watch", daemon=True)
        watcher.start()
        try:
            yield requested
        finally:
            finished.set()
            watcher.join()

    def collect_batch(self, iteration: int, weight_version: str) -> TrainBatch | EnginesLostWeights | None:
        """Rollout and rewards for `iteration` (1-based) with the engine at `weight_version`. None when an
        operator's `pause --now` interrupted the rollout: its trajectories wait in the replay buffer.
        EnginesLostWeights when an engine restarted without the pushed version: the trajectories wait for
        the version to be pushed again, then for this call again."""
        config = self.config
        expected = config.data.prompts_per_iteration * config.rollout.samples_per_prompt
        answered_before = [engine.completed for engine in self.master.stats()]
        self._engine_lost_weights = False
        with self._progress(f"rollout {iteration}", expected) as advance, self._pause_now_watch() as interrupt:
            self._rollout_interrupt = interrupt
            try:
                rollout = self.partial_rollout.run_iteration(iteration, weight_version, interrupt=interrupt,
                                                             on_trajectory_done=lambda _: advance())
            except (RolloutFailed, StaleWeightsError) as error:
                raise RunError(str(error)) from None
            finally:
                self._rollout_interrupt = None
        if rollout.interrupted and self._engine_lost_weights:
            operation = self.pending_operation()
            if operation is None or not operation.now:  # an operator's pause --now comes first
                self.console.print(f"driver: rollout {iteration} interrupted: an engine restarted without weight "
                                   f"version {weight_version}; {len(self.partial_rollout.groups)} prompt groups wait "
                                   "for it to be pushed again")
                return EnginesLostWeights(weight_version)
        if rollout.interrupted:
            self.console.print(f"driver: rollout {iteration} interrupted by pause --now; "
                               f"{len(self.partial_rollout.groups)} prompt groups kept in the replay buffer")
            return None
        self.replay_buffer.save(self.partial_rollout.state(iteration))
        samples = rollout.trajectories()
        if not samples:
            raise RunError(f"rollout {iteration}: every prompt group failed; the first error: "
                           f"{rollout.errors[0] if rollout.errors else 'none recorded'}")
        reward_started = time.monotonic()
        scores = self._score(samples, f"it{iteration}")
        task_rewards = torch.tensor([score.reward for score in scores], dtype=torch.float32)
        correct = torch.tensor([score.correct for score in scores])
        lengths = torch.tensor([sample.response_length for sample in samples], dtype=torch.float32)
        group_ids = torch.tensor([sample.group_id for sample in samples])
        penalty_weight = algo.length_penalty_weight(iteration - 1, config.algo.length_penalty_weight,
                                                    config.algo.length_penalty_warmup_iterations)
        rewards = task_rewards + penalty_weight * algo.length_reward(lengths, correct, group_ids)
        for group in rollout.finished_groups:  # prioritized sampling follows each prompt's success rate
            solved = sum(bool(c) for c, sample in zip(correct.tolist(), samples) if sample.group_id == group.group_id)
            self.sampler.record_outcomes(group.prompt_index, solved, len(group.trajectories))
        old_segment_loss = config.rollout.partial.old_segment_loss
        batch = TrainBatch(
            token_ids=[sample.token_ids for sample in samples],
            loss_mask=[sample.loss_mask(weight_version, old_segment_loss) for sample in samples],
            rewards=rewards.tolist(), group_ids=group_ids.tolist(),
            rollout_logprobs=[sample.rollout_logprobs(weight_version) for sample in samples],
        )
        self._save_rollouts(iteration, samples, scores, rewards.tolist())
        self._last_rollout_stats = {
            "weight_version": weight_version,
            "prompts": len(rollout.finished_groups),
            "samples": len(samples),
            "failed_groups": len(rollout.failed_groups),
            "failed_requests": rollout.failed_requests,
            "reward_mean": task_rewards.mean().item(),
            "shaped_reward_mean": rewards.mean().item(),
            "length_penalty_weight": penalty_weight,
            "accuracy": correct.float().mean().item(),
            "response_len_mean": lengths.mean().item(),
            "response_len_p95": percentile(lengths.tolist(), 0.95),
            "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(samples),
            "degenerate_fraction": sum(s.degenerate for s in samples) / len(samples),
            **self._rollout_throughput(rollout, answered_before),
            "reward_seconds": time.monotonic() - reward_started,
        }
        if rollout.failed_groups:
            logger.warning("iteration %d: %d prompt group(s) dropped after failed requests, e.g. %s", iteration,
                           len(rollout.failed_groups), rollout.errors[0] if rollout.errors else "?")
        return batch

    def _rollout_throughput(self, rollout: IterationResult, answered_before: list[int]) -> dict:
        """Throughput and partial-rollout bookkeeping of one iteration's rollout (`answered_before`: requests
        each engine had answered when it began)."""
        return {
            "rollout_tokens_per_s": rollout.output_tokens / rollout.seconds if rollout.seconds > 0 else math.nan,
            "rollout_output_tokens": rollout.output_tokens,
            "engine_busy_fraction": rollout.busy_fraction,
            "engine_requests": [engine.completed - before  # answered in this rollout, per engine
                                for engine, before in zip(self.master.stats(), answered_before)],
            "generate_seconds": rollout.seconds,
            "continued_trajectories": rollout.continued_trajectories,
            "carried_over_tokens": rollout.carried_over_tokens,
            "wasted_tokens": rollout.wasted_tokens,
            "replay_buffer_groups": len(self.partial_rollout.groups),
            "replay_buffer_tokens": self.partial_rollout.buffered_tokens,
        }

    def _save_rollouts(self, iteration: int, samples: list[Sample], scores: list[RewardResult], rewards: list[float]) -> None:
        if not self.config.logging.save_rollouts:
            return
        path = self.rollouts_dir / f"iteration-{iteration:06d}.jsonl"
        for sample, score, reward in zip(samples, scores, rewards):
            append_json_line(path, {
                "prompt_id": sample.prompt.record.id, "group_id": sample.group_id, "sample_index": sample.sample_index,
                "response": sample.response_text,
                "response_tokens": sample.response_length, "finish_reason": sample.finish_reason,
                "weight_versions": sample.weight_versions, "answer": score.extracted_answer,
                "reference_answer": sample.prompt.record.answer, "reason": score.reason, "reward": reward,
            })

    # --- evaluation and logs -------------------------------------------------------------------------

    def evaluate(self, after_iterations: int, weight_version: str) -> dict:
        """Greedy answers to the held-out prompts; appended to RUN_DIR/eval.jsonl."""
        if not self.eval_prompts:
            return {}
        config = self.config
        sampling = SamplingParams(max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
                                  temperature=0.0)
        rollout = self._generate(self.eval_prompts, 1, sampling, weight_version, after_iterations,
                                 f"eval after {after_iterations} iterations")
        scores = self._score(rollout.samples, f"eval{after_iterations}")
        result = {
            "after_iterations": after_iterations, "weight_version": weight_version, "prompts": len(rollout.samples),
            "accuracy": sum(score.correct for score in scores) / max(len(scores), 1),
            "response_len_mean": sum(len(s.response_ids) for s in rollout.samples) / max(len(rollout.samples), 1),
        }
        append_json_line(self.run_dir / "eval.jsonl", result)
        self._evaluations.append(result)
        self.console.print(f"eval after {after_iterations} iterations: accuracy {result['accuracy']:.3f} on "
                           f"{result['prompts']} held-out prompts (greedy), mean length {result['response_len_mean']:.1f} tokens")
        return result

    def finish_run(self, iterations: int) -> None:
        """The run did all its iterations: record it, and print the summary."""
        self.phases.enter("done", iterations, str(iterations))
        self.publish_status("done", iterations, str(iterations), message="all iterations done")
        minutes, seconds = divmod(int(time.monotonic() - self._started), 60)
        line = f"run complete: {iterations} iterations in {minutes}m{seconds:02d}s"
        if len(self._evaluations) >= 2:
            first, last = self._evaluations[0], self._evaluations[-1]
            line += (f"; held-out accuracy {first['accuracy']:.3f} → {last['accuracy']:.3f} "
                     f"(greedy, {last['prompts']} prompts)")
        self.console.print(f"{line}; records in {self.run_dir}", style="bold")

    def report_startup(self, weights: SyncedWeights) -> None:
        seconds = self.phases.take_seconds()  # start-up, not an iteration: counted apart from iteration 1
        guard = "" if self._swap_check is None else (
            f"; swap guard: probe log-probs within {self._swap_check.mean_gap:.2e} of the trainer's "
            f"({self._swap_check.seconds:.2f} s)")
        self.console.print(f"driver: the engine serves weight version {weights.weight_version} "
                           f"({weights.bytes / 1e6:.1f} MB synced by {self.config.hybrid.weight_sync} in "
                           f"{seconds.get('sync', 0.0):.2f} s){guard}")

    def finish_iteration(self, iteration: int, train_metrics: dict, weights: SyncedWeights,
                         offloaded: OffloadResult | None, onloaded: OffloadResult | None) -> None:
        """One complete metrics line (and table row) for the iteration."""
        phase_seconds = self.phases.take_seconds()
        offload = {}
        if offloaded is not None and onloaded is not None:
            offload = {"offload_bytes": offloaded.bytes_copied, "device_free_bytes_after_offload": offloaded.device_free_bytes,
                       "device_free_bytes_after_onload": onloaded.device_free_bytes}
        record = {"iteration": iteration, **self._last_rollout_stats, **train_metrics,
                  **{f"{phase}_seconds": seconds for phase, seconds in phase_seconds.items()},
                  "iteration_seconds": sum(phase_seconds.values()),
                  "weight_sync_bytes": weights.bytes, "weight_sync_seconds": weights.seconds,
                  "weight_sync_gb_per_s": weights.gigabytes_per_second, "new_weight_version": weights.weight_version,
                  "engine_restarts": sum(status.restarts for status in self.engines.statuses()), **offload,
                  **(self._swap_check.metrics() if self._swap_check is not None else {})}
        self.metrics.write(record)
        self.table.row(record)
        self._recent = (self._recent + [IterationSummary(
            iteration=iteration, reward_mean=record.get("reward_mean"), accuracy=record.get("accuracy"),
            rollout_tokens_per_s=record.get("rollout_tokens_per_s"))])[-RECENT_ITERATIONS:]
        self.publish_status("running", iteration, weights.weight_version)

    # --- the run's state: status, operator requests, checkpoints ----------------------------------------

    def publish_status(self, state: str, iteration: int, weight_version: str | None, operation=None,
                       message: str | None = None) -> None:
        self.run_control.publish(RunStatus(
            run_name=self.config.control.run_name, run_dir=str(self.run_dir), state=state, driver=self.phases.driver,
            iteration=iteration, weight_version=weight_version, last_checkpoint=self._last_checkpoint,
            recent=self._recent, operation=operation, message=message,
            engines=[EngineSummary(state=engine.state, engine_url=engine.engine_url,
                                   weight_version=engine.weight_version, restarts=engine.restarts)
                     for engine in self.engines.statuses()]))

    def pending_operation(self) -> RunOperation | None:
        return self.run_control.pending_operation()

    def checkpoint_files(self, iteration: int) -> dict[str, bytes]:
        """The driver's part of a run checkpoint: enough to continue exactly after `iteration`."""
        state = DriverState(iteration=iteration, sampler=self.sampler.state_dict(), evaluations=self._evaluations,
                            recent=self._recent, python_rng=random.getstate(),
                            torch_rng=base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode())
        return {DRIVER_STATE_FILE: state.model_dump_json().encode(),
                REPLAY_BUFFER_FILE: encode_state(self.partial_rollout.state(iteration))}

    def checkpoint_saved(self, checkpoints: RunCheckpoints, iteration: int) -> None:
        checkpoints.mark_latest(iteration)
        self._last_checkpoint = str(checkpoints.path(iteration))
        self.console.print(f"driver: checkpoint of iteration {iteration} saved in {self._last_checkpoint}")

    def restore(self, checkpoint: Path) -> int:
        """Continue a run from its checkpoint; returns the iteration it ended. Records of later iterations
        (a crashed run's) are set aside, not deleted."""
        state = DriverState.model_validate_json(read_run_file(checkpoint, DRIVER_STATE_FILE))
        self.sampler.load_state_dict(state.sampler)
        buffer = decode_state(read_run_file(checkpoint, REPLAY_BUFFER_FILE), f"{checkpoint}/run/{REPLAY_BUFFER_FILE}")
        try:
            self.partial_rollout.restore(buffer)
        except ValueError as error:
            raise UserError(f"checkpoint {checkpoint}: its replay buffer does not fit this run's prompts ({error}); "
                            "resume with the data settings the run was started with") from None
        self._evaluations = state.evaluations
        self._recent = state.recent
        random.setstate(tuple(item if not isinstance(item, list) else tuple(item) for item in state.python_rng))
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state.torch_rng)), dtype=torch.uint8))
        self._last_checkpoint = str(checkpoint)
        for path in set_aside_after(self.run_dir, state.iteration):
            self.console.print(f"driver: records of iterations after {state.iteration} set aside in {path}")
        self.console.print(f"driver: resuming after iteration {state.iteration} from {checkpoint}")
        return state.iteration

    def conclude(self, operation: RunOperation, iteration: int) -> None:
        """Carry out a pause or stop at the end of `iteration` (its checkpoint is saved already)."""
        state, phase = ("paused", "paused") if operation.op == "pause" else ("stopped", "done")
        self.phases.enter(phase, iteration, str(iteration))
        self.run_control.clear_operation()
        how = (f"resume with: megatron-rl runs resume {self.run_dir}" if operation.op == "pause"
               else "stopped for good; its last checkpoint stays")
        self.publish_status(state, iteration, str(iteration), operation, message=how)
        self.console.print(f"run {state} after iteration {iteration} (checkpoint {self._last_checkpoint}); {how}",
                           style="bold")
