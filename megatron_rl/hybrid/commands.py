"""`megatron-rl sidecar` (the pod's rollout container, owning the inference engine) and `megatron-rl
local-pod` (one pod's processes on one machine)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    sidecar = subparsers.add_parser(
        "sidecar", help="run the pod's sidecar: start and own the rollout engine (model.hf_path, rollout.*), serve "
                        "its control API (hybrid.sidecar_host/port) and publish its status (control.*)")
    add_sidecar_arguments(sidecar)
    sidecar.set_defaults(handler=run_sidecar)

    pod = subparsers.add_parser(
        "local-pod", help="run one pod's layout on this machine: etcd, the sidecar (and its engine) and the trainer, "
                          "each its own process")
    pod.add_argument("--config", help="YAML run config")
    pod.add_argument("--run-dir", required=True, help="new directory for the run's records and every process's log")
    pod.add_argument("--iterations", type=int, help="RL iterations (overrides train.iterations)")
    pod.add_argument("--pods", type=int, default=1,
                     help="pods whose engines roll out (default 1): a sidecar each, the others the trainer's "
                          "hybrid.peer_sidecar_urls, as on a multi-node cluster, each pod with its own shared memory "
                          "(hybrid.weight_sync disk or nccl)")
    pod.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides for every process")
    pod.set_defaults(handler=run_local_pod)


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (the same file as the run's)")
    parser.add_argument("--log-dir", help="where the engine's log goes (default: TMPDIR/megatron-rl-sidecar-POD)")
    parser.add_argument("--engine-port", type=int, help="the engine's port on rollout.engine_host (default: a free one)")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. hybrid.pod_name=pod-3")


def run_sidecar(args: argparse.Namespace) -> int:
    import logging

    from megatron_rl.config import load_config
    from megatron_rl.errors import UserError
    from megatron_rl.hybrid.sidecar_server import serve

    if args.engine_port is not None and not 0 < args.engine_port < 65536:
        raise UserError(f"--engine-port must be in 1..65535 (got {args.engine_port})")
    config = load_config(args.config, args.overrides)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(config, log_dir=args.log_dir, engine_port=args.engine_port)


def run_local_pod(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megatron_rl.errors import UserError
    from megatron_rl.hybrid.local_pod import run_local_pod as run

    overrides = list(args.overrides)
    if args.iterations is not None:
        if args.iterations < 1:
            raise UserError(f"--iterations must be ≥ 1 (got {args.iterations})")
        overrides.append(f"train.iterations={args.iterations}")
    if args.pods < 1:
        raise UserError(f"--pods must be ≥ 1 (got {args.pods})")
    return run(args.config, Path(args.run_dir), overrides, pods=args.pods)
