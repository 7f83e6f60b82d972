"""Run metrics: `RUN_DIR/metrics.jsonl`, TensorBoard, and a one-line-per-iteration console table.

Each metrics line is written with a single append of the complete line and fsync'd, so a crash
never leaves half a record behind; non-finite numbers are written as null (JSON has no NaN).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from megatron_rl.atomic_file import atomic_text_file

logger = logging.getLogger(__name__)

# (metric key, column title, format) of the console table.
CONSOLE_COLUMNS = (
    ("iteration", "iter", "{:>5d}"),
    ("reward_mean", "reward", "{:>7.3f}"),
    ("accuracy", "acc", "{:>6.3f}"),
    ("response_len_mean", "len", "{:>6.1f}"),
    ("response_len_p95", "len95", "{:>6.0f}"),
    ("rollout_tokens_per_s", "tok/s", "{:>7.1f}"),
    ("rollout_seconds", "roll s", "{:>7.1f}"),
    ("train_seconds", "train s", "{:>7.1f}"),
    ("weight_sync_seconds", "sync s", "{:>6.2f}"),
    ("loss", "loss", "{:>9.4f}"),
    ("grad_norm", "|grad|", "{:>8.3f}"),
    ("rollout_logprob_gap", "lp gap", "{:>8.1e}"),
)


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def append_json_line(path: Path, record: dict) -> None:
    """Append one complete JSON line with a single write, then fsync."""
    line = (json.dumps(json_safe(record), allow_nan=False) + "\n").encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars (`logging.tensorboard`) under RUN_DIR/tensorboard."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                logger.warning("TensorBoard logging is off: %s (pip install tensorboard)", error)
            else:
                self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        append_json_line(self.path, record)
        if self._writer is not None:
            step = record["iteration"]
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class ConsoleTable:
    """Prints a header once, then one aligned row per iteration."""

    def __init__(self, console: Console):
        self.console = console
        self._header_printed = False

    def row(self, record: dict) -> None:
        if not self._header_printed:
            widths = [len(fmt.format(0 if "d}" in fmt else 0.0)) for _, _, fmt in CONSOLE_COLUMNS]
            self.console.print(" ".join(title.rjust(width) for (_, title, _), width in zip(CONSOLE_COLUMNS, widths)),
                               style="bold", highlight=False)
            self._header_printed = True
        cells = []
        for key, _, fmt in CONSOLE_COLUMNS:
            value = record.get(key)
            width = len(fmt.format(0 if "d}" in fmt else 0.0))
            ok = isinstance(value, (int, float)) and (isinstance(value, int) or math.isfinite(value))
            cells.append(fmt.format(value) if ok else "-".rjust(width))
        self.console.print(" ".join(cells), highlight=False)


# The run's per-iteration records and the field that names each record's iteration.
ITERATION_LOGS = {"metrics.jsonl": "iteration", "eval.jsonl": "after_iterations"}


def set_aside_after(run_dir: Path, iteration: int) -> list[Path]:
    """Before resuming from the checkpoint of `iteration`: move what a crashed run logged about later
    iterations out of the logs (into `*.after-<iteration>-<time>` files and folders, nothing deleted), so
    the resumed run's records follow the checkpoint without gaps or repeats. Returns what was set aside."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name, field in ITERATION_LOGS.items():
        path = run_dir / name
        if not path.is_file():
            continue
        kept, later = [], []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the crash
                later.append(line)
                continue
            (later if record.get(field, 0) > iteration else kept).append(line)
        if later:
            aside = run_dir / f"{name}.after-{iteration}-{stamp}"
            aside.write_text("\n".join(later) + "\n")
            with atomic_text_file(path) as file:
                file.write("".join(line + "\n" for line in kept))
            moved.append(aside)
    later_rollouts = [p for p in sorted((run_dir / "rollouts").glob("iteration-*.jsonl"))
                      if int(p.stem.split("-")[1]) > iteration]
    if later_rollouts:
        aside = run_dir / "rollouts" / f"after-{iteration}-{stamp}"
        aside.mkdir()
        for path in later_rollouts:
            path.rename(aside / path.name)
        moved.append(aside)
    return moved
