"""The RL iteration loop (k1.5 §2.3): rollout → reward → train → weight sync, once per iteration.

It runs on every trainer rank (local TP×PP workers, or torchrun's ranks). Global rank 0 also holds
the Driver (driver.py: engine, prompts, rewards, logs); what the driver produces reaches the other
ranks through `on_driver`. Weight versions: the engine serves version i-1 while iteration i rolls
out, and every sample is checked to come from it; training then produces version i.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import yaml

from megatron_rl.config import Config
from megatron_rl.errors import RunError, UserError
from megatron_rl.hf_checkpoint import SafetensorsReader, read_hf_config, resolve_hf_dir
from megatron_rl.hybrid.weight_sync import DiskWeightSync
from megatron_rl.train import parallel
from megatron_rl.train.model import architecture_from_hf_config, check_parallel_layout
from megatron_rl.train.trainer import PolicyTrainer

# A rollout can take long; the ranks waiting for it must not time out meanwhile.
DRIVER_WAIT = timedelta(hours=24)


def run_rl(config: Config, run_dir: Path) -> None:
    """Check what can be checked here, then run the loop on TP×PP ranks."""
    model_dir = resolve_hf_dir(config.model.hf_path or _missing_model())
    architecture = architecture_from_hf_config(read_hf_config(model_dir))
    check_parallel_layout(architecture, config.parallel.tp, config.parallel.pp)
    prepare_run_dir(run_dir, config)
    parallel.launch(_run_on_rank, config.parallel.tp * config.parallel.pp, config, run_dir, model_dir)


def _run_on_rank(config: Config, run_dir: Path, model_dir: Path) -> None:
    from megatron_rl.driver import Driver

    with parallel.model_parallel(config.parallel.tp, config.parallel.pp, seed=config.train.seed):
        architecture = architecture_from_hf_config(read_hf_config(model_dir))
        trainer = PolicyTrainer(config, architecture, model_dir)
        trainer.load_hf(SafetensorsReader(model_dir))
        group = dist.new_group(backend="gloo", timeout=DRIVER_WAIT)
        context_length = min(config.model.max_sequence_length, architecture.max_position_embeddings)
        driver_context = _driver_or_error(group, lambda: Driver(config, run_dir, model_dir, context_length))
        with driver_context as driver, DiskWeightSync(config.hybrid.shm_dir, run_dir,
                                                      config.hybrid.bucket_size_mb * 2**20) as weight_sync:
            on_driver = _on_driver(group, driver)
            weights = weight_sync.write(trainer, "0")
            on_driver(lambda d: d.load_weights(weight_sync, weights))
            on_driver(lambda d: d.evaluate(0, "0"))
            for iteration in range(1, config.train.iterations + 1):
                timer = PhaseTimer()
                with timer("rollout"):
                    batch = on_driver(lambda d: d.collect_batch(iteration, weight_version=str(iteration - 1)))
                with timer("train"):
                    train_metrics = trainer.train_iteration(batch)
                with timer("weight_sync"):
                    weights = weight_sync.write(trainer, str(iteration))
                    on_driver(lambda d: d.load_weights(weight_sync, weights))
                on_driver(lambda d: d.finish_iteration(iteration, train_metrics, timer.seconds, weights))
                interval = config.eval.interval
                if (interval and iteration % interval == 0) or iteration == config.train.iterations:
                    on_driver(lambda d: d.evaluate(iteration, str(iteration)))
            on_driver(lambda d: d.print_summary(config.train.iterations))


class PhaseTimer:
    """Wall-clock seconds per named phase of one iteration, plus the iteration's total."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started = time.monotonic()

    @contextmanager
    def __call__(self, phase: str):
        started = time.monotonic()
        yield
        self.seconds[phase] = time.monotonic() - started
        self.seconds["iteration"] = time.monotonic() - self._started


def _on_driver(group, driver) -> Callable[[Callable[[Any], Any]], Any]:
    """`on_driver(fn)`: rank 0 runs fn(driver); every rank gets its result, or raises its error."""

    def run(function: Callable[[Any], Any]) -> Any:
        message: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                message[0] = ("ok", function(driver))
            except (UserError, RunError) as error:
                message[0] = (type(error).__name__, str(error))
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


def prepare_run_dir(run_dir: Path, config: Config) -> None:
    """Create the run directory and record the resolved config; never overwrite another run's records."""
    if (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run (metrics.jsonl); choose a new --run-dir (nothing was overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))


def _missing_model() -> str:
    raise UserError("model.hf_path is not set; give a HF model directory or builtin:NAME (e.g. builtin:tiny-digits)")
