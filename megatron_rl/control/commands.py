"""`megatron-rl runs list | status | pause | resume | stop`: operate RL runs.

RUN is a run directory (`--run-dir` of `megatron-rl train`) or, with `--etcd URL`, a run name
(control.run_name) in that etcd. Pause and stop take effect at the run's next iteration boundary: a
full checkpoint, then the run frees its devices and reports paused (stopped). `--kubernetes` also
suspends the run's Job (its pods go, and with them the GPUs) and `resume --kubernetes` unsuspends it,
whose pods then continue from the checkpoint (`train --auto-resume`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers) -> None:
    runs = subparsers.add_parser("runs", help="list, inspect, pause, resume and stop RL runs")
    actions = runs.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, help: str, handler, with_run: bool = True):
        parser = actions.add_parser(name, help=help)
        if with_run:
            parser.add_argument("run", metavar="RUN", help="a run directory, or with --etcd a run name")
        parser.add_argument("--etcd", metavar="URL", help="the etcd the run reports to (default: RUN is a directory)")
        parser.set_defaults(handler=handler)
        return parser

    listing = add("list", "the runs of a directory of run directories, or of an etcd", _list, with_run=False)
    listing.add_argument("--runs-dir", default="runs", help="where run directories live (default: runs)")
    add("status", "phase, iteration, reward and accuracy trend, throughput, checkpoint, engine health", _status)
    for name, verb in (("pause", "pause (checkpoint and free the devices; resumable)"), ("stop", "stop for good")):
        parser = add(name, f"{verb} at the run's next iteration boundary", _request)
        parser.add_argument("--now", action="store_true",
                            help="interrupt the rollout in progress instead (its partial trajectories are kept)")
        _add_kubernetes_arguments(parser)
    resume = add("resume", "continue a paused (or failed) run from its latest checkpoint", _resume)
    _add_kubernetes_arguments(resume)


def _add_kubernetes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubernetes", action="store_true", help="also suspend (resume: unsuspend) the run's Job")
    parser.add_argument("--namespace", default="default", help="the Job's namespace (default: default)")
    parser.add_argument("--job", help="the Job's name (default: the run's name)")


def _control(args: argparse.Namespace):
    from megatron_rl.control.operations import RunControl, control_for_run_dir

    if args.etcd:
        from megatron_rl.control.etcd_store import EtcdStore

        store = EtcdStore([args.etcd])
        status = RunControl(Path("."), args.run, store).status()
        return RunControl(Path(status.run_dir) if status else Path("."), args.run, store)
    return control_for_run_dir(Path(args.run))


def _known_status(control, run: str):
    from megatron_rl.errors import UserError

    status = control.status()
    if status is None:
        raise UserError(f"run {run} has reported no status yet (has it started?); check RUN")
    return status


def _list(args: argparse.Namespace) -> int:
    from megatron_rl.control.operations import RunControl, control_for_run_dir
    from megatron_rl.errors import UserError

    rows = []
    if args.etcd:
        from megatron_rl.control.etcd_store import EtcdStore
        from megatron_rl.control.store import RUNS_PREFIX

        store = EtcdStore([args.etcd])
        names = sorted({key[len(RUNS_PREFIX):].split("/", 1)[0] for key in store.get_prefix(RUNS_PREFIX)})
        rows = [(name, RunControl(Path("."), name, store).status()) for name in names]
    else:
        root = Path(args.runs_dir)
        if not root.is_dir():
            raise UserError(f"--runs-dir {root} is not a directory; point it at where your run directories live")
        for directory in sorted(p for p in root.iterdir() if (p / "config.yaml").is_file()):
            try:
                rows.append((str(directory), control_for_run_dir(directory).status()))
            except UserError as error:  # one unreadable run (its etcd gone, say) must not hide the others
                rows.append((str(directory), str(error)))
    print(f"{'RUN':40s} {'STATE':8s} {'ITERATION':>9s} {'REWARD':>7s}  CHECKPOINT")
    for name, status in rows:
        if status is None or isinstance(status, str):
            print(f"{name:40s} {'?':8s} {'':>9s} {'':>7s}  {status or 'no status reported yet'}")
            continue
        reward = status.recent[-1].reward_mean if status.recent else None
        print(f"{name:40s} {_state(status):8s} {status.iteration:>9d} {_number(reward):>7s}  {status.last_checkpoint or '-'}")
    return 0


def _state(status) -> str:
    from megatron_rl.control.operations import driver_alive

    if status.state == "running" and driver_alive(status.driver) is False:
        return "dead"  # it reported running, but its process is gone: resume it
    return status.state


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _status(args: argparse.Namespace) -> int:
    control = _control(args)
    status = _known_status(control, args.run)
    pending = control.pending_operation()
    print(f"run        {status.run_name} ({status.run_dir})")
    print(f"state      {_state(status)}{' — ' + status.message if status.message else ''}")
    print(f"driver     {status.driver}; updated {status.updated_at}")
    print(f"iteration  {status.iteration}; weight version {status.weight_version or '-'}")
    print(f"checkpoint {status.last_checkpoint or 'none yet'}")
    for engine in status.engines:
        print(f"engine     {engine.state} at {engine.engine_url}, weight version {engine.weight_version or '-'}, "
              f"{engine.restarts} restart(s)")
    for record in control.registered_weights():
        for copy in record.directories:
            print(f"weights    version {record.weight_version} on {copy.host} at {copy.path}: {len(copy.files)} "
                  f"files, {sum(copy.files.values()) / 1e6:.1f} MB")
    if pending is not None:
        print(f"pending    {pending.op}{' (now)' if pending.now else ''}, requested {pending.requested_at}")
    if status.recent:
        print("recent     iteration  reward  accuracy  rollout tok/s")
        for summary in status.recent:
            print(f"           {summary.iteration:>9d}  {_number(summary.reward_mean):>6s}  {_number(summary.accuracy):>8s}"
                  f"  {_number(summary.rollout_tokens_per_s):>13s}")
    return 0


def _request(args: argparse.Namespace) -> int:
    from megatron_rl.control.operations import RunOperation, driver_alive
    from megatron_rl.errors import UserError

    control = _control(args)
    status = _known_status(control, args.run)
    if status.state != "running" or driver_alive(status.driver) is False:
        raise UserError(f"run {args.run} is not running (it is {_state(status)}); nothing to {args.action}")
    pending = control.pending_operation()
    if pending is not None:
        raise UserError(f"run {args.run} already has a pending {pending.op} (requested {pending.requested_at}); "
                        "wait for it")
    if args.kubernetes:
        from megatron_rl.control.kubernetes import JobControl

        job = args.job or status.run_name
        jobs = JobControl(args.namespace)
        jobs.suspended(job)  # before the run is asked: a Job that cannot be suspended leaves the run untouched
    control.request(RunOperation(op=args.action, now=args.now))
    when = ("now (a rollout in progress is interrupted; its partial trajectories are kept)" if args.now
            else "after its current iteration")
    print(f"{args.action} requested: run {args.run} stops {when}, with a checkpoint")
    if args.kubernetes:
        jobs.wait_for_state_then_suspend(job, control, want=("paused", "stopped"))
        print(f"job {args.namespace}/{job} suspended: its pods are gone and their GPUs free")
    return 0


def _resume(args: argparse.Namespace) -> int:
    from megatron_rl.control.operations import driver_alive
    from megatron_rl.errors import UserError
    from megatron_rl.train.checkpoint import RunCheckpoints

    control = _control(args)
    status = _known_status(control, args.run)
    if status.state == "running" and driver_alive(status.driver) is not False:
        raise UserError(f"run {args.run} is running; nothing to resume")
    if status.state == "stopped":
        raise UserError(f"run {args.run} was stopped for good; start a new run from its checkpoint instead")
    if status.state == "done":
        raise UserError(f"run {args.run} finished all its iterations; to train it further: megatron-rl train "
                        f"--run-dir {status.run_dir} --resume --iterations N (N in all)")
    if args.kubernetes:
        from megatron_rl.control.kubernetes import JobControl

        job = args.job or status.run_name
        JobControl(args.namespace).set_suspended(job, False)
        print(f"job {args.namespace}/{job} resumed: its pods continue run {status.run_name} from its latest checkpoint")
        return 0
    checkpoint = RunCheckpoints(status.run_dir).latest()  # verifies it: a corrupt one is an error here
    if checkpoint is None:
        raise UserError(f"run {args.run} has no complete checkpoint in {status.run_dir}/checkpoints; it cannot resume")
    print(f"resuming run {status.run_name} from {checkpoint}", flush=True)
    command = [sys.executable, "-m", "megatron_rl.cli", "train", "--run-dir", status.run_dir, "--resume"]
    os.execv(sys.executable, command)
    return 0  # not reached: the process became the trainer
