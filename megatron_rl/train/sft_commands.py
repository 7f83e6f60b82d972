"""`megatron-rl sft` and `megatron-rl dpo`: supervised training on megatron-core, written as a checkpoint."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    for name, help_text, example in (
        ("sft", "supervised fine-tuning on prompt/response JSONL (loss on the responses only)",
         "megatron_rl/examples/sft.yaml"),
        ("dpo", "DPO on preference-pair JSONL (e.g. from `long2short dpo-pairs`)", "megatron_rl/examples/dpo.yaml"),
    ):
        parser = subparsers.add_parser(name, help=help_text)
        parser.add_argument("--config", help=f"YAML {name} config (e.g. {example})")
        parser.add_argument("--out", required=True, help="new directory for the trained megatron-rl checkpoint")
        parser.add_argument("overrides", nargs="*", metavar="key=value",
                            help="dotted config overrides, e.g. data.train_file=sft.jsonl train.lr=1e-5")
        parser.set_defaults(handler=_sft if name == "sft" else _dpo)


def _quiet_megatron() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # it logs its whole optimizer config at INFO


def _sft(args: argparse.Namespace) -> int:
    from megatron_rl.train.sft import load_sft_config, run_sft

    config = load_sft_config(args.config, args.overrides)
    _quiet_megatron()
    run_sft(config, args.out)
    return 0


def _dpo(args: argparse.Namespace) -> int:
    from megatron_rl.train.dpo import load_dpo_config, run_dpo

    config = load_dpo_config(args.config, args.overrides)
    _quiet_megatron()
    run_dpo(config, args.out)
    return 0
