"""Pushing the trainer's weights into the engine without disk: SGLang's tensor path and its broadcast path.

`TensorWeightSync` (`hybrid.weight_sync=cuda_ipc`): every bucket is flattened into one uint8 buffer and
handed to the engine by handle with `update_weights_from_tensor` (load_format "flattened_bucket"): a
CUDA-IPC handle on GPU (colocated with SGLang), a shared-memory file on CPU (the embedded engine). The
engine copies from the trainer's buffer, which is kept until the call returns. On GPU every bucket gets
a fresh buffer, never a reused one: SGLang answers once the copies are enqueued, not done (torch holds
a shared block until the engine lets go of it; `torch.cuda.ipc_collect` frees it then). On CPU one
shared-memory buffer (the largest bucket's size) is reused for every bucket and push until `close()`:
the embedded engine has copied everything when it answers, and fresh shared memory costs a page fault
per 4 KiB (it made the flatten 3-5× slower than the copy itself).

`DistributedWeightSync` (`hybrid.weight_sync=nccl`): the engine joins a process group the trainer hosts
(`init_weights_update_group`, NCCL on GPU, gloo on CPU, one group per pipeline stage); per bucket the
trainer announces names, dtypes and shapes with `update_weights_from_distributed` and broadcasts the
tensors (by default one broadcast of the bucket flattened in `names` order) while that call waits.
The groups live until `close()`. NCCL cannot connect two ranks on one GPU: this path is for an engine on
other GPUs than the trainer's.

Both are collectives over the trainer ranks: every rank calls `push(trainer, weight_version)`. Each
pipeline stage streams its own weights from `convert.iter_hf_buckets` (HF names, gathered over TP, at
most `hybrid.bucket_size_mb` per bucket unless one tensor is bigger); the stage's leader (TP rank 0 of
data-parallel replica 0) talks to the engine, the other TP ranks of replica 0 take part in the TP
gathers, the other replicas do nothing. Global rank 0 opens the engine's weight-update session before
any stage sends; once every stage is done it closes the session, flushes the cache, sets the weight
version (`update_weight_version`: with PP > 1 no stage knows which bucket is the last) and checks that
`/model_info` reports it. A failure on any rank (the engine refused a bucket, reports another version,
a broadcast failed) raises the same EngineError on every rank; the session is closed first.

Peak memory beyond the trainer's own shards, per stage leader: the bucket `iter_hf_buckets` holds
(≤ bucket size; TP-gathered or regrouped tensors are copies, tensors of an unsharded parameter may
alias it) plus, for a flattened bucket, its flat copy (the same size): at most 2 × bucket size, one
bucket in flight; on GPU the flat copy is freed before the next bucket is gathered, on CPU the shared
buffer (≤ bucket size) stays allocated between pushes until `close()`. The other TP ranks of the stage hold one
gathered bucket. The per-tensor broadcast (`load_format=None`) needs no flat copy: 1 × bucket size.
"""
from __future__ import annotations

import functools
import logging
import re
import socket
import threading
import time
import urllib.parse
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_rl.hybrid.weight_sync import SyncedWeights
from megatron_rl.net import free_port
from megatron_rl.rollout.client import EngineClient
from megatron_rl.rollout.protocol import EngineError
from megatron_rl.rollout.weight_transport import (
    FLATTENED_BUCKET, aligned_order, dtype_name, dump_payload, flatten, join_weights_update_group,
    leave_weights_update_group, shared_buffer,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 0.001  # how often a pending broadcast checks whether the engine refused the call


def engine_tp_size(engine: EngineClient) -> int:
    """The engine's TP size (SGLang's `/server_info` `tp_size`): payloads per tensor update, ranks in a group."""
    return int(engine.server_info().get("tp_size", 1))


def local_address_towards(url: str) -> str:
    """This host's address on the route to `url`'s host (loopback for a local engine): where the engine
    can reach a process group this side hosts."""
    parts = urllib.parse.urlsplit(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((parts.hostname or "127.0.0.1", parts.port or 80))  # UDP: no packet is sent
        return probe.getsockname()[0]


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _in_background(function: Callable[..., Any], *args, **kwargs) -> Future:
    """Run `function` on a daemon thread (it may block until a peer that never comes times out)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name=f"weight-push-{function.__name__}", daemon=True).start()
    return future


def _attempt(action: Callable[[], Any]) -> str | None:
    """None if `action` ran, else what went wrong (a message travels to the other ranks; an exception may not)."""
    try:
        action()
    except EngineError as error:
        return str(error)
    except Exception as error:  # a gloo/NCCL or memory error: the engine did not get the weights either
        return f"{type(error).__name__}: {error}"
    return None


def _agree(failures: list[str | None]) -> None:
    """Raise the first failure of any rank as EngineError on every rank (collective)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, [failure for failure in failures if failure is not None])
    for rank_failures in gathered:
        for message in rank_failures:
            raise EngineError(f"weight push failed: {message}")


class _EngineWeightPush:
    """What both paths share: the session, the bucket stream, errors agreed over ranks. See the module doc."""

    def __init__(self, engine_url: str, bucket_bytes: int, timeout: float = 600.0, api_key: str | None = None):
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be ≥ 1, got {bucket_bytes}")
        self.engine = EngineClient(engine_url, timeout=timeout, api_key=api_key)
        self.bucket_bytes = bucket_bytes
        self.timeout = timeout

    def _prepare(self) -> None:
        """On each stage leader, before the session opens."""

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        """On each stage leader: hand one bucket to the engine; return its bytes."""
        raise NotImplementedError

    def push(self, trainer, weight_version: str, named_parameters=None) -> SyncedWeights:
        """Collective: push `trainer.model`'s weights (HF names) into the engine as `weight_version`.
        `named_parameters`: where to read them (default: the live parameters; an offloaded trainer passes
        its pinned CPU copies, TrainerOffload.named_parameters())."""
        from megatron.core import parallel_state

        from megatron_rl.train.convert import iter_hf_buckets

        started = time.monotonic()
        first_rank = dist.get_rank() == 0
        streams = parallel_state.get_data_parallel_rank() == 0
        leader = streams and parallel_state.get_tensor_model_parallel_rank() == 0
        _agree([_attempt(self._prepare) if leader else None])
        _agree([_attempt(self.engine.begin_weight_update) if first_rank else None])
        sent = buckets = 0
        failure: str | None = None

        def send(bucket: list[tuple[str, torch.Tensor]]) -> None:
            nonlocal sent, buckets
            sent += self._send(bucket)
            buckets += 1

        if streams:
            for bucket in iter_hf_buckets(trainer.model, trainer.arch, self.bucket_bytes,
                                          named_parameters=named_parameters):
                if leader and failure is None:  # after a failure the stage keeps iterating: TP gathers are collective
                    failure = _attempt(functools.partial(send, bucket))
                del bucket  # one bucket alive at a time: the stream builds the next one now
        totals: list = [None] * dist.get_world_size()
        dist.all_gather_object(totals, (sent, buckets, failure))
        failed = any(rank_failure is not None for _, _, rank_failure in totals)
        finish = _attempt(lambda: self._finish(weight_version, failed)) if first_rank else None
        _agree([failure, finish])
        return SyncedWeights(weight_version, None, sum(t[0] for t in totals), time.monotonic() - started,
                             buckets=sum(t[1] for t in totals))

    def _finish(self, weight_version: str, failed: bool) -> None:
        self.engine.end_weight_update()  # closed even after a failed stage, so the next push can open one
        if failed:
            return
        self.engine.flush_cache()
        self.engine.update_weight_version(weight_version, abort_all_requests=False)
        reported = self.engine.weight_version()
        if reported != weight_version:
            raise EngineError(f"the engine at {self.engine.base_url} reports weight version {reported!r} after "
                              f"the push of version {weight_version!r}")

    def close(self) -> None:
        """Release what the push holds between versions (every rank may call it)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorWeightSync(_EngineWeightPush):
    """`hybrid.weight_sync=cuda_ipc`: buckets handed over by CUDA-IPC (GPU) or shared-memory (CPU) handle."""

    def __init__(self, engine_url: str, bucket_bytes: int, timeout: float = 600.0, api_key: str | None = None):
        super().__init__(engine_url, bucket_bytes, timeout, api_key)
        self._payloads_per_bucket: int | None = None
        self._cpu_buffer: torch.Tensor | None = None  # reused on CPU, see the module docstring

    def _prepare(self) -> None:
        if self._payloads_per_bucket is None:
            self._payloads_per_bucket = engine_tp_size(self.engine)
            if torch.cuda.is_available():
                _patch_cuda_reductions()

    def _buffer(self, nbytes: int) -> torch.Tensor:
        device = _device()
        if device.type != "cpu":
            return shared_buffer(nbytes, device)
        if self._cpu_buffer is None or self._cpu_buffer.numel() < nbytes:
            self._cpu_buffer = None  # the old one goes before the bigger one comes
            self._cpu_buffer = shared_buffer(nbytes, device)
        return self._cpu_buffer[:nbytes]

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        buffer, metadata = flatten(aligned_order(bucket), self._buffer)
        payload = {"flattened_tensor": buffer, "metadata": metadata}
        # One dump per engine TP rank: each takes the reference on the shared memory that its rank releases.
        # Every rank opens the same buffer (on GPU: this rank's device; SGLang copies to its own).
        self.engine.update_weights_from_tensor([dump_payload(payload) for _ in range(self._payloads_per_bucket)],
                                               load_format=FLATTENED_BUCKET, flush_cache=False)
        nbytes = buffer.numel()
        del payload, buffer
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # free earlier buckets' blocks the engine has let go of
        return nbytes

    def close(self) -> None:
        self._cpu_buffer = None


def _patch_cuda_reductions() -> None:
    """SGLang's producer-side patch: CUDA-IPC handles name the GPU by UUID, so trainer and engine may see
    different CUDA_VISIBLE_DEVICES. Without SGLang installed, both must number the GPUs alike."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        log.warning("sglang is not importable in the trainer: CUDA-IPC handles carry device indices, so the trainer "
                    "and the engine must see the GPUs under the same CUDA_VISIBLE_DEVICES numbering")
        return
    monkey_patch_torch_reductions()


class DistributedWeightSync(_EngineWeightPush):
    """`hybrid.weight_sync=nccl`: the engine receives buckets by broadcast in a group this side hosts.

    `master_address`: where the engine reaches this rank (default: this host's address towards the engine).
    `load_format`: "flattened_bucket" (one broadcast per bucket) or None (one per tensor).
    """

    def __init__(self, engine_url: str, bucket_bytes: int, timeout: float = 600.0, api_key: str | None = None, *,
                 master_address: str | None = None, load_format: str | None = FLATTENED_BUCKET):
        super().__init__(engine_url, bucket_bytes, timeout, api_key)
        if load_format not in (None, FLATTENED_BUCKET):
            raise ValueError(f"load_format must be None or {FLATTENED_BUCKET!r}, got {load_format!r}")
        self.master_address = master_address
        self.load_format = load_format
        self._group: dist.ProcessGroup | None = None
        self._group_name: str | None = None
        self._abandoned: list[str] = []  # engine-side groups of broadcasts that failed half-way
        self._joins = 0

    def _prepare(self) -> None:
        for name in self._abandoned:
            _attempt(lambda: self.engine.destroy_weights_update_group(name))  # best effort; a fresh group follows
        self._abandoned.clear()
        if self._group is None:
            self._join()

    def _join(self) -> None:
        from megatron.core import parallel_state

        self._joins += 1
        # Unique in this process, which may push to several engines: one group per engine, stage and join.
        engine = re.sub(r"[^A-Za-z0-9]+", "-", urllib.parse.urlsplit(self.engine.base_url).netloc)
        name = f"megatron-rl-weights-{engine}-pp{parallel_state.get_pipeline_model_parallel_rank()}-{self._joins}"
        world_size = 1 + engine_tp_size(self.engine)
        address = self.master_address or local_address_towards(self.engine.base_url)
        port = free_port(address)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # The engine's call returns once both sides joined; ours blocks until the engine joins.
        engine_side = _in_background(self.engine.init_weights_update_group, address, port, 1, world_size, name,
                                     backend, timeout=self.timeout)
        own_side = _in_background(join_weights_update_group, address, port, 0, world_size, name, backend,
                                  timedelta(seconds=self.timeout))
        done, _ = wait([engine_side, own_side], timeout=self.timeout, return_when=FIRST_EXCEPTION)
        for side in (engine_side, own_side):
            if side in done and side.exception() is not None:
                raise side.exception()
        engine_side.result(timeout=0)
        self._group, self._group_name = own_side.result(timeout=0), name

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        ordered = aligned_order(bucket)
        if self.load_format == FLATTENED_BUCKET:
            device = _device()
            flat, _ = flatten(ordered, lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device=device))
            tensors = [flat]
        else:
            tensors = [tensor.to(_device()) for _, tensor in ordered]  # NCCL sends device memory only
        request = _in_background(
            self.engine.update_weights_from_distributed, [name for name, _ in ordered],
            [dtype_name(tensor.dtype) for _, tensor in ordered], [list(tensor.shape) for _, tensor in ordered],
            group_name=self._group_name, load_format=self.load_format, flush_cache=False)
        works = [dist.broadcast(tensor, group_src=0, group=self._group, async_op=True) for tensor in tensors]
        try:
            while not all(work.is_completed() for work in works):
                if request.done() and request.exception() is not None:
                    raise request.exception()  # refused before receiving: these broadcasts would wait for nothing
                time.sleep(POLL_SECONDS)
            for work in works:
                work.wait()
        except Exception as failure:
            # This group is done for (a pending broadcast times out in the background, a failed one broke it);
            # the next push joins a fresh one. The engine's answer says best what went wrong.
            self._abandoned.append(self._group_name)
            self._group = self._group_name = None
            refusal = request.exception(timeout=self.timeout)
            if refusal is not None and refusal is not failure:
                raise refusal from failure
            raise
        request.result()
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def close(self) -> None:
        if self._group is None:
            return
        group, name = self._group, self._group_name
        self._group = self._group_name = None
        try:
            self.engine.destroy_weights_update_group(name)
        except EngineError as error:  # the engine may be gone already; our side is released regardless
            log.warning("destroying the engine's side of weight-update group %s failed: %s", name, error)
        leave_weights_update_group(group)
