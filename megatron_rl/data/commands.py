"""`megatron-rl data ...` subcommands."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare prompt sets (JSONL)")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")

    arithmetic = actions.add_parser("make-arithmetic", help="write a synthetic integer-arithmetic prompt set")
    arithmetic.add_argument("--out", required=True, help="JSONL file to write (replaced atomically)")
    arithmetic.add_argument("--count", type=int, required=True, help="number of distinct problems")
    arithmetic.add_argument("--seed", type=int, required=True, help="same seed, same problems")
    arithmetic.add_argument("--max-operand", type=int, default=100, help="operands are drawn from [1, M]")
    arithmetic.add_argument("--operand-count", type=int, default=2, help="operands per problem (difficulty)")
    arithmetic.add_argument("--operations", default="+-*", help="operations to draw from, e.g. '+-'")
    arithmetic.set_defaults(handler=_make_arithmetic)


def _make_arithmetic(args: argparse.Namespace) -> int:
    from megatron_rl.data.arithmetic import generate_arithmetic_prompts
    from megatron_rl.data.prompts import write_prompts

    records = generate_arithmetic_prompts(
        args.count,
        args.seed,
        max_operand=args.max_operand,
        operations=tuple(args.operations),
        operand_count=args.operand_count,
    )
    write_prompts(args.out, records)
    print(f"wrote {len(records)} arithmetic prompts to {args.out}")
    return 0
