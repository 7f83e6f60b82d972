"""`megatron-rl ARGS` in this process, with paths and numbers as arguments."""
from __future__ import annotations

from megatron_rl.cli import main


def run_cli(*argv) -> int:
    return main([str(arg) for arg in argv])
