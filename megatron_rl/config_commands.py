"""`megatron-rl config show`: validate a run config (with overrides) and print the resolved tree."""
from __future__ import annotations

import argparse

import yaml


def register(subparsers) -> None:
    config = subparsers.add_parser("config", help="inspect run configs")
    actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="validate a config and print it with every default filled in")
    show.add_argument("--config", help="YAML run config")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. algo.tau=0.05")
    show.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    from megatron_rl.config import load_config

    print(yaml.safe_dump(load_config(args.config, args.overrides).model_dump(), sort_keys=False), end="")
    return 0
