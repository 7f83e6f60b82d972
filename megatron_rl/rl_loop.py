"""The RL iteration loop (k1.5 §2.3): rollout → reward → train → weight sync, once per iteration.

It runs on every trainer rank (local TP×PP workers, or torchrun's ranks). Global rank 0 also holds
the Driver (driver.py: engine, prompts, rewards, logs, the run's phase record); what the driver
produces reaches the other ranks through `on_driver`. Trainer and engine share the devices, so each
iteration walks the phases of hybrid/phases.py: rollout → release (the engine's memory) → onload (the
trainer's) → train → offload → sync (engine weights resumed, new weights pushed and checked, the rest
resumed; the swap guard compares the engine's log-probs of probe sequences with the trainer's).
Weight versions: the engine serves version i-1 while iteration i rolls out, and every sample is
checked to come from it; training then produces version i. An engine that crashes and comes back
without a pushed version (cuda_ipc, nccl) gets version i-1 pushed again mid-rollout (rollout → sync →
rollout), from the trainer, which still holds it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
import yaml

from megatron_rl.config import Config
from megatron_rl.errors import RunError, UserError
from megatron_rl.hf_checkpoint import SafetensorsReader, read_hf_config, resolve_hf_dir
from megatron_rl.hybrid.swap_guard import ProbeReference, trainer_reference
from megatron_rl.hybrid.weight_sync import EnginesLostWeights, SyncedWeights, open_weight_sync
from megatron_rl.metrics import set_aside_after
from megatron_rl.train import parallel
from megatron_rl.train.checkpoint import RunCheckpoints
from megatron_rl.train.model import architecture_from_hf_config, check_parallel_layout
from megatron_rl.train.offload import TrainerOffload
from megatron_rl.train.trainer import PolicyTrainer

# A rollout can take long; the ranks waiting for it must not time out meanwhile.
DRIVER_WAIT = timedelta(hours=24)


def run_rl(config: Config, run_dir: Path, resume: Literal["no", "yes", "auto"] = "no") -> None:
    """Check what can be checked here, then run the loop on TP×PP ranks. `resume`: continue from the
    run's latest complete checkpoint (yes: it must have one; auto: if it has one, else start afresh)."""
    model_dir = resolve_hf_dir(config.model.hf_path or _missing_model())
    architecture = architecture_from_hf_config(read_hf_config(model_dir))
    check_parallel_layout(architecture, config.parallel.tp, config.parallel.pp)
    checkpoint = RunCheckpoints(run_dir).latest() if resume != "no" else None
    if resume == "yes" and checkpoint is None:
        raise UserError(f"{run_dir} has no complete checkpoint to resume from (checkpoints/latest); start a new run "
                        "without --resume")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank gets here; one writes the run's records
        prepare_run_dir(run_dir, config, resuming=checkpoint is not None, restart=resume == "auto")
    parallel.launch(_run_on_rank, config.parallel.tp * config.parallel.pp, config, run_dir, model_dir, checkpoint)


def _run_on_rank(config: Config, run_dir: Path, model_dir: Path, checkpoint: Path | None) -> None:
    from megatron_rl.driver import Driver

    with parallel.model_parallel(config.parallel.tp, config.parallel.pp, seed=config.train.seed):
        architecture = architecture_from_hf_config(read_hf_config(model_dir))
        trainer = PolicyTrainer(config, architecture, model_dir)
        trainer.load_hf(SafetensorsReader(model_dir))
        offload = TrainerOffload(trainer) if _offload_enabled(config) else None
        group = dist.new_group(backend="gloo", timeout=DRIVER_WAIT)
        context_length = min(config.model.max_sequence_length, architecture.max_position_embeddings)
        checkpoints = RunCheckpoints(run_dir, keep=config.train.keep_checkpoints)
        driver_context = _driver_or_error(group, lambda: Driver(config, run_dir, model_dir, context_length))
        with driver_context as driver:
            on_driver = _on_driver(group, driver)
            engine_urls, probes = on_driver(lambda d: (d.engines.engine_urls, d.swap_probes))
            with open_weight_sync(config, run_dir, engine_urls) as weight_sync:
                _iterate(config, trainer, offload, checkpoints, checkpoint, weight_sync, on_driver, probes)


def _iterate(config: Config, trainer: PolicyTrainer, offload: TrainerOffload | None, checkpoints: RunCheckpoints,
             checkpoint: Path | None, weight_sync, on_driver, probes: list[list[int]]) -> None:
    """The iterations, on every rank; `on_driver` runs a step on rank 0's Driver."""

    def phase(name: str, iteration: int, weight_version: str) -> None:
        on_driver(lambda d: d.enter_phase(name, iteration, weight_version))

    def reference() -> ProbeReference | None:
        """The swap guard's trainer side, while the trainer holds the weights about to be synced."""
        return trainer_reference(trainer, probes) if probes else None

    def sync(iteration: int, weight_version: str, probe_reference: ProbeReference | None) -> SyncedWeights:
        """Engine weights resumed → `weight_version` pushed and checked → the rest resumed."""
        phase("sync", iteration, weight_version)
        on_driver(lambda d: d.prepare_engine_for_weights())
        # An offloaded trainer's weights are read from its pinned CPU copies.
        weights = weight_sync.push(trainer, weight_version, offload.named_parameters() if offload else None)
        on_driver(lambda d: d.load_weights(weights, probe_reference))
        return weights

    def evaluate(iteration: int) -> None:
        phase("eval", iteration, str(iteration))
        on_driver(lambda d: d.evaluate(iteration, str(iteration)))

    def save(iteration: int) -> None:
        """A run checkpoint: trainer (any-layout dist checkpoint) + the driver's state, then `latest`."""
        phase("checkpoint", iteration, str(iteration))
        files = on_driver(lambda d: d.checkpoint_files(iteration))
        trainer.save(checkpoints.path(iteration), iteration, run_files=files)
        on_driver(lambda d: d.checkpoint_saved(checkpoints, iteration))

    iterations, start = config.train.iterations, 1
    if checkpoint is not None:
        trainer.load(checkpoint)  # model, optimizer and LR schedule, resharded to this layout
        start = on_driver(lambda d: d.restore(checkpoint)) + 1
    probe_reference = reference()  # of the weights the engine serves (version start - 1)
    startup_weights = sync(start - 1, str(start - 1), probe_reference)
    on_driver(lambda d: d.report_startup(startup_weights))
    if start == 1:
        evaluate(0)
    for iteration in range(start, iterations + 1):
        served = str(iteration - 1)  # the weight version the engine serves in this rollout
        phase("rollout", iteration, served)
        batch = on_driver(lambda d: d.collect_batch(iteration, weight_version=served))
        while isinstance(batch, EnginesLostWeights):  # a crashed engine is back without the pushed version
            sync(iteration, served, probe_reference)  # the trainer still holds it: push it again, roll out on
            phase("rollout", iteration, served)
            batch = on_driver(lambda d: d.collect_batch(iteration, weight_version=served))
        phase("release", iteration, served)
        on_driver(lambda d: d.release_engine())
        phase("onload", iteration, served)
        onloaded = offload.onload() if offload else None
        if batch is None:  # `pause --now` interrupted the rollout: the state after the last iteration, kept
            operation = on_driver(lambda d: d.pending_operation())
            save(iteration - 1)  # with the interrupted rollout's trajectories in its replay buffer
            on_driver(lambda d: d.conclude(operation, iteration - 1))
            return
        phase("train", iteration, served)
        train_metrics = trainer.train_iteration(batch)
        probe_reference = reference()
        operation = on_driver(lambda d: d.pending_operation())  # pause or stop, by an operator
        if operation or _save_due(config, iteration):
            save(iteration)  # here, before the devices go back to the engine: the state is all on them
        phase("offload", iteration, served)
        offloaded = offload.offload() if offload else None
        weights = sync(iteration, str(iteration), probe_reference)
        on_driver(lambda d: d.finish_iteration(iteration, train_metrics, weights, offloaded, onloaded))
        if (config.eval.interval and iteration % config.eval.interval == 0) or iteration == iterations:
            evaluate(iteration)
        if operation:
            on_driver(lambda d: d.conclude(operation, iteration))
            return
    on_driver(lambda d: d.finish_run(iterations))


def _save_due(config: Config, iteration: int) -> bool:
    interval = config.train.save_interval
    return bool(interval and iteration % interval == 0) or (config.train.save_final and iteration == config.train.iterations)


def _offload_enabled(config: Config) -> bool:
    # On CPU the "device" memory is the host's: moving it to pinned host memory would gain nothing.
    return config.train.offload if config.train.offload is not None else torch.cuda.is_available()


def _on_driver(group, driver) -> Callable[[Callable[[Any], Any]], Any]:
    """`on_driver(fn)`: rank 0 runs fn(driver); every rank gets its result, or raises its error."""

    def run(function: Callable[[Any], Any]) -> Any:
        message: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                message[0] = ("ok", function(driver))
            except (UserError, RunError) as error:  # subclasses travel as their family
                message[0] = ("UserError" if isinstance(error, UserError) else "RunError", str(error))
            except Exception as error:  # other ranks must not wait forever for a driver that failed
                message[0] = ("RunError", f"the driver failed: {type(error).__name__}: {error}")
                dist.broadcast_object_list(message, src=0, group=group)
                raise
        dist.broadcast_object_list(message, src=0, group=group)
        kind, value = message[0]
        if kind == "ok":
            return value
        raise {"UserError": UserError, "RunError": RunError}[kind](value)

    return run


def _driver_or_error(group, create: Callable[[], Any]):
    """The Driver on rank 0 (a context that closes it), nothing elsewhere; a failed start stops every rank."""
    created: list[Any] = [None]

    def start(_) -> None:
        created[0] = create()

    _on_driver(group, None)(start)
    return _closing(created[0]) if created[0] is not None else nullcontext(None)


@contextmanager
def _closing(driver):
    try:
        yield driver
    finally:
        driver.close()


def prepare_run_dir(run_dir: Path, config: Config, resuming: bool = False, restart: bool = False) -> None:
    """Create the run directory and record the resolved config; never overwrite another run's records.

    Resuming, the logs go on. A restart with nothing to resume from (`--auto-resume` before the first
    checkpoint) sets the earlier attempt's logs aside and starts afresh."""
    if not resuming and (run_dir / "metrics.jsonl").exists():
        if not restart:
            raise UserError(f"{run_dir} already holds a run (metrics.jsonl); choose a new --run-dir, or continue it "
                            "with --resume (nothing was overwritten)")
        set_aside_after(run_dir, 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))


def _missing_model() -> str:
    raise UserError("model.hf_path is not set; give a HF model directory or builtin:NAME (e.g. builtin:tiny-digits)")
