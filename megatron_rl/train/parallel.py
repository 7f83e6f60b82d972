"""Process groups for megatron-core, and local workers so `--tp 2 --pp 2` works on one machine.

Under torchrun (or the Helm chart's trainer container) the environment already names the rank,
so `launch` runs the function in place. Otherwise it spawns `world_size` local processes that
rendezvous over loopback: gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing

from megatron_rl.errors import RunError, UserError
from megatron_rl.net import free_port
from megatron_rl.train import cpu_shim

# Checkpoint writes and conversion can be slow on 2 cores, but a peer that died must not hang us.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


_SINGLE_RANK_ENVIRONMENT = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _init_process_group() -> None:
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)


@contextmanager
def model_parallel(tp: int, pp: int, seed: int = 1234) -> Iterator[None]:
    """Initialise torch.distributed (if needed) and megatron's TP/PP groups; tear down after."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cpu_shim.apply_if_needed()
    owns_process_group = not dist.is_initialized()
    single_rank_environment = owns_process_group and not under_launcher()
    if single_rank_environment:  # one in-process rank, e.g. the CLI at TP=PP=1
        os.environ.update(_SINGLE_RANK_ENVIRONMENT, MASTER_PORT=str(free_port()))
    if owns_process_group:
        _init_process_group()
    world_size = dist.get_world_size()
    if world_size % (tp * pp) != 0:
        raise UserError(f"parallel.tp × parallel.pp = {tp * pp} does not divide the world size {world_size}; launch a multiple of TP×PP ranks")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owns_process_group:
            dist.destroy_process_group()
        if single_rank_environment:  # a later launch() must not mistake this process for a torchrun rank
            for name in (*_SINGLE_RANK_ENVIRONMENT, "MASTER_PORT"):
                os.environ.pop(name, None)


def launch(function: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run `function(*args)` on `world_size` ranks and return each rank's result.

    A UserError or RunError raised on any rank is raised here with its message, so the CLI can print
    it as one line; other exceptions propagate with the worker's traceback.
    """
    if under_launcher() or world_size == 1:
        return [function(*args)]
    with tempfile.TemporaryDirectory(prefix="megatron-rl-launch-") as result_dir:
        port = free_port()
        torch.multiprocessing.start_processes(
            _worker, args=(function, world_size, port, result_dir, args), nprocs=world_size, start_method="spawn"
        )
        results = [pickle.loads((Path(result_dir) / f"rank{rank}.pkl").read_bytes()) for rank in range(world_size)]
    for kind, value in results:
        if kind in _CARRIED_ERRORS:
            raise _CARRIED_ERRORS[kind](value)
    return [value for _, value in results]


_CARRIED_ERRORS = {"user_error": UserError, "run_error": RunError}


def _worker(rank: int, function: Callable[..., Any], world_size: int, port: int, result_dir: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # Each worker gets an equal share of the cores instead of all of them (oversubscription is slow).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    # One process group for the worker's life: megatron's groups may be rebuilt inside it, but
    # re-creating the gloo group itself in one process races on its ports.
    _init_process_group()
    try:
        outcome = ("ok", function(*args))
    except UserError as error:
        outcome = ("user_error", str(error))
    except RunError as error:
        outcome = ("run_error", str(error))
    finally:
        dist.destroy_process_group()
    (Path(result_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(outcome))
