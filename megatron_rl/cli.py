"""`megatron-rl` command line. Each area registers its own subcommands in its `commands.py`.

User errors (bad config, files, arguments) print one line and exit 2, without a traceback; a run
that cannot go on (RunError) prints one line and exits 1.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from megatron_rl.errors import RunError, UserError

# Modules with `register(subparsers)`; each parser sets `handler(args) -> int | None`.
COMMAND_MODULES = (
    "megatron_rl.config_commands",
    "megatron_rl.train.commands",
    "megatron_rl.train.sft_commands",
    "megatron_rl.long2short.commands",
    "megatron_rl.data.commands",
    "megatron_rl.rollout.commands",
    "megatron_rl.rollout.bench_commands",
    "megatron_rl.reward.sandbox.commands",
    "megatron_rl.hybrid.commands",
    "megatron_rl.control.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rl", description="k1.5-style RL for LLMs on megatron-core")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except UserError as error:
        print(f"megatron-rl {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RunError as error:
        print(f"megatron-rl {args.command}: run stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"megatron-rl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
