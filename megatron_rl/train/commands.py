"""`megatron-rl train` (the RL run), `megatron-rl export` and `megatron-rl convert ...` subcommands."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="run RL: rollout → reward → train → weight sync, per iteration")
    train.add_argument("--config", help="YAML run config (e.g. megatron_rl/examples/tiny.yaml)")
    train.add_argument("--run-dir", required=True, help="new directory for the run's metrics, logs and rollouts")
    train.add_argument("--iterations", type=int, help="RL iterations in all (overrides train.iterations)")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its latest checkpoint, with the config it recorded")
    resume.add_argument("--auto-resume", action="store_true",
                        help="like --resume if the run has a checkpoint, else start it (for restarted pods)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. algo.tau=0.05")
    train.set_defaults(handler=_train)

    export = subparsers.add_parser("export", help="write a run's latest checkpoint as a HF model directory")
    export.add_argument("--run-dir", required=True, help="the run's directory")
    export.add_argument("--out", required=True, help="new HF model directory")
    export.add_argument("--bucket-mb", type=int, default=512, help="bound on one streamed bucket (MiB)")
    export.set_defaults(handler=_export)

    convert = subparsers.add_parser("convert", help="convert weights between HF and megatron-core")
    actions = convert.add_subparsers(dest="action", required=True, metavar="ACTION")

    to_mcore = actions.add_parser("hf-to-mcore", help="HF safetensors or GGUF → megatron dist checkpoint")
    to_mcore.add_argument("--hf", required=True, help="HF model directory (safetensors, or one .gguf file)")
    to_mcore.add_argument("--out", required=True, help="new checkpoint directory")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    to_mcore.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    to_mcore.set_defaults(handler=_hf_to_mcore)

    to_hf = actions.add_parser("mcore-to-hf", help="megatron checkpoint → HF safetensors, streamed in buckets")
    to_hf.add_argument("--mcore", required=True, help="megatron-rl checkpoint directory")
    to_hf.add_argument("--out", required=True, help="new HF model directory")
    to_hf.add_argument("--bucket-mb", type=int, default=512, help="bound on one streamed bucket (MiB)")
    to_hf.set_defaults(handler=_mcore_to_hf)

    verify = actions.add_parser("verify", help="compare megatron-core and transformers logits on random tokens")
    verify.add_argument("--hf", required=True, help="HF model directory (safetensors, or one .gguf file)")
    verify.add_argument("--tp", type=int, default=1)
    verify.add_argument("--pp", type=int, default=1)
    verify.add_argument("--tolerance", type=float, default=1e-3, help="max allowed |Δlogits|")
    verify.add_argument("--sequence-length", type=int, default=32)
    verify.set_defaults(handler=_verify)


def _train(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from megatron_rl.config import load_config
    from megatron_rl.errors import UserError
    from megatron_rl.rl_loop import run_rl

    overrides = list(args.overrides)
    if args.iterations is not None:
        _positive(args, "iterations")
        overrides.append(f"train.iterations={args.iterations}")
    run_dir = Path(args.run_dir)
    recorded = run_dir / "config.yaml"
    if args.resume and args.config:
        raise UserError("a resumed run keeps the config it recorded (RUN_DIR/config.yaml); drop --config and "
                        "pass changes as key=value overrides")
    if args.resume and not recorded.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); nothing to resume")
    config_path = recorded if (args.resume or (args.auto_resume and recorded.is_file())) else args.config
    config = load_config(config_path, overrides)
    logging.basicConfig(level=config.logging.level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.logging.level != "DEBUG":  # megatron logs its whole optimizer config and parameter list at INFO
        logging.getLogger("megatron").setLevel(logging.WARNING)
    run_rl(config, run_dir, resume="yes" if args.resume else "auto" if args.auto_resume else "no")
    return 0


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_rl.errors import UserError
    from megatron_rl.train.checkpoint import RunCheckpoints
    from megatron_rl.train.convert_commands import mcore_to_hf

    _positive(args, "bucket_mb")
    checkpoint = RunCheckpoints(args.run_dir).latest()
    if checkpoint is None:
        raise UserError(f"{args.run_dir} has no complete checkpoint (checkpoints/latest); nothing to export")
    mcore_to_hf(checkpoint, Path(args.out), args.bucket_mb)
    return 0


def _positive(args: argparse.Namespace, *names: str) -> None:
    from megatron_rl.errors import UserError

    for name in names:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be ≥ 1 (got {getattr(args, name)})")


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from megatron_rl.train.convert_commands import hf_to_mcore

    _positive(args, "tp", "pp")
    hf_to_mcore(args.hf, args.out, args.tp, args.pp, args.dtype)
    return 0


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from megatron_rl.train.convert_commands import mcore_to_hf

    _positive(args, "bucket_mb")
    mcore_to_hf(args.mcore, args.out, args.bucket_mb)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megatron_rl.train.convert_commands import verify

    _positive(args, "tp", "pp", "sequence_length")
    result = verify(args.hf, args.tp, args.pp, args.tolerance, sequence_length=args.sequence_length)
    verdict = "OK" if result.passed else "FAIL"
    print(
        f"{verdict}: max |Δlogits| = {result.max_abs_logits_difference:.3e} (tolerance {result.tolerance:.1e}, "
        f"max |logit| {result.max_abs_logit:.2f}) at TP={args.tp} PP={args.pp}"
    )
    return 0 if result.passed else 1
