"""How weights reach an engine without a checkpoint on disk: SGLang 0.5.23's two transports, both sides.

Used by the trainer side (`hybrid/tensor_sync.py`) and by the embedded engine (`embedded_server.py`,
`embedded_engine.py`), so both speak exactly what SGLang speaks (/work/shared/reference/sglang-api.md §1.8, §1.9).

Tensor payloads (`/update_weights_from_tensor`)
    A payload is a `multiprocessing.reduction.ForkingPickler` dump, base64 in JSON, one per engine TP rank
    (SGLang's `MultiprocessingSerializer`). ForkingPickler reduces a tensor to a handle on its memory, not
    its bytes: a CUDA tensor to a CUDA-IPC handle, a CPU tensor to the name of its shared-memory file. So
    only a few hundred bytes cross HTTP; the engine maps the producer's memory and copies from it. CPU
    tensors are shared under torch's "file_system" strategy (the default "file_descriptor" strategy passes
    descriptors through a socket authenticated per process tree, which an unrelated engine process cannot
    open), so producer and engine must see the same /dev/shm and /tmp (one host or one container).
    With load_format "flattened_bucket" the payload is `{"flattened_tensor": 1-D uint8, "metadata": [entry]}`,
    each entry with name, shape, dtype, start_idx, end_idx, numel — byte offsets, numel = the entry's bytes —
    which is what SGLang's `FlattenedTensorBucket` reads (duck-typed). Entries are `types.SimpleNamespace`,
    which SGLang's restricted unpickler accepts (a class of ours would be refused). Tensors of a bucket are
    laid out largest element size first, so every offset is a multiple of its dtype's size (SGLang views
    each slice as its dtype, which needs that).
    `load_payload` is the engine's restricted unpickler: only builtin containers and scalars,
    `types.SimpleNamespace`, torch dtypes/sizes and torch's tensor and CPU-storage rebuild functions.

Broadcast groups (`/init_weights_update_group`, `/update_weights_from_distributed`)
    Trainer (rank 0, which hosts the TCP store) and engine (ranks rank_offset..) join one process group the
    way SGLang's `init_custom_process_group` does — TCP rendezvous at master_address:master_port, the store
    prefixed with the group name, torch's group constructor — so a trainer joins a real SGLang server's
    group and the embedded engine a trainer's. The group is separate from any default group of the
    process. Tensors go by `broadcast` from group rank 0 in `names` order; a flattened broadcast bucket is
    their bytes concatenated in `names` order (`layout`).
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import os
import pickle
import types
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.multiprocessing.reductions  # noqa: F401 (registers torch's ForkingPickler reductions)
from multiprocessing.reduction import ForkingPickler

FLATTENED_BUCKET = "flattened_bucket"
METADATA_FIELDS = ("name", "shape", "dtype", "start_idx", "end_idx", "numel")


class PayloadError(ValueError):
    """A tensor payload that cannot be read: bad base64, a refused Python global, or a malformed bucket."""


# ---------------------------------------------------------------------------------------------------
# Layout of a bucket
# ---------------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's spelling of a dtype on the wire ("bfloat16"): `getattr(torch, name)` gives it back."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
    return dtype


def aligned_order(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors largest element size first (stable), so each one's byte offset is a multiple of its size."""
    return sorted(named_tensors, key=lambda item: -item[1].element_size())


def layout(entries: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> list[types.SimpleNamespace]:
    """Metadata of tensors (name, dtype, shape) packed back to back in this order; offsets in bytes."""
    metadata, offset = [], 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        if offset % dtype.itemsize:
            raise ValueError(f"tensor {name}: byte offset {offset} is not a multiple of its {dtype_name(dtype)} "
                             f"element size; order the bucket largest element size first")
        metadata.append(types.SimpleNamespace(name=name, shape=torch.Size(shape), dtype=dtype, start_idx=offset,
                                              end_idx=offset + size, numel=size))
        offset += size
    return metadata


def flatten(named_tensors: Sequence[tuple[str, torch.Tensor]],
            allocate: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, list]:
    """One uint8 buffer holding the tensors' bytes in the given order (see `aligned_order`), and its metadata.

    `allocate(nbytes)` gives the buffer (1-D uint8, nbytes long): `shared_buffer` for a tensor payload,
    so that pickling it copies nothing.
    """
    metadata = layout([(name, tensor.dtype, tensor.shape) for name, tensor in named_tensors])
    buffer = allocate(metadata[-1].end_idx if metadata else 0)
    for (_, tensor), entry in zip(named_tensors, metadata):
        buffer[entry.start_idx:entry.end_idx].view(tensor.dtype).copy_(tensor.reshape(-1))
    return buffer, metadata


def unflatten(buffer: torch.Tensor, metadata: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    """Views of `buffer` (1-D uint8) per metadata entry, each checked against the buffer and its shape."""
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise PayloadError("flattened_tensor must be a 1-D torch.uint8 tensor")
    tensors = []
    for index, entry in enumerate(metadata):
        missing = [name for name in METADATA_FIELDS if not hasattr(entry, name)]
        if missing:
            raise PayloadError(f"metadata[{index}] has no {', '.join(missing)} (entries need {', '.join(METADATA_FIELDS)})")
        name, shape, dtype = entry.name, entry.shape, entry.dtype
        start, end, numel = entry.start_idx, entry.end_idx, entry.numel
        if not isinstance(name, str) or not isinstance(dtype, torch.dtype):
            raise PayloadError(f"metadata[{index}]: name must be a str and dtype a torch.dtype")
        if not all(isinstance(v, int) for v in (start, end, numel, *shape)):
            raise PayloadError(f"metadata[{index}] ({name}): shape, start_idx, end_idx and numel must be integers")
        size = math.prod(shape) * dtype.itemsize
        if not (0 <= start <= end <= buffer.numel()) or end - start != size or numel != size:
            raise PayloadError(f"metadata[{index}] ({name}): bytes [{start}, {end}) with numel {numel} do not hold "
                               f"shape {tuple(shape)} of {dtype_name(dtype)} ({size} bytes) inside the "
                               f"{buffer.numel()}-byte flattened_tensor")
        if start % dtype.itemsize:
            raise PayloadError(f"metadata[{index}] ({name}): start_idx {start} is not a multiple of the "
                               f"{dtype_name(dtype)} element size")
        tensors.append((name, buffer[start:end].view(dtype).view(tuple(shape))))
    return tensors


# ---------------------------------------------------------------------------------------------------
# Payloads
# ---------------------------------------------------------------------------------------------------


@contextmanager
def _file_system_sharing() -> Iterator[None]:
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)


_shm_manager_started = False


def _start_shm_manager() -> None:
    """Start torch's shared-memory manager (`torch_shm_manager`, one per producing process) holding no
    descriptor of ours.

    libshm forks it without closing descriptors, and it lives as long as any consumer (the engine)
    keeps a connection to it, which is as long as the engine runs. Inheriting, say, the liveness pipe
    of a multiprocessing-spawned trainer rank, it would keep that rank's parent waiting for an exit
    that already happened. So every inheritable descriptor is made non-inheritable for the fork.
    """
    global _shm_manager_started
    if _shm_manager_started:
        return
    inheritable = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) > 2 and os.get_inheritable(int(name)):
                inheritable.append(int(name))
        except OSError:  # the descriptor listdir itself used, closed by now
            continue
    for descriptor in inheritable:
        os.set_inheritable(descriptor, False)
    try:
        torch.UntypedStorage._new_shared(1)  # the first shared allocation starts the manager
    finally:
        for descriptor in inheritable:
            os.set_inheritable(descriptor, True)
    _shm_manager_started = True


def shared_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """An uninitialised uint8 buffer another process can map: shared memory on CPU, device memory on GPU."""
    if device.type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    with _file_system_sharing():
        _start_shm_manager()
        storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))


def dump_payload(obj: Any) -> str:
    """SGLang's `MultiprocessingSerializer.serialize(obj, output_str=True)`: tensors travel as handles.

    Call once per engine TP rank: each dump takes its own reference on shared CPU memory, which the
    engine rank that loads it gives back.
    """
    stream = io.BytesIO()
    with _file_system_sharing():
        _start_shm_manager()  # CPU tensors not in shared memory yet are moved there while pickled
        ForkingPickler(stream).dump(obj)
    return base64.b64encode(stream.getvalue()).decode("ascii")


def _torch_load_bytes(data: bytes):
    """`torch.storage._load_from_bytes` (plain-pickled storages) without its unrestricted nested unpickler."""
    return torch.load(io.BytesIO(data), weights_only=True)


_ALLOWED_GLOBALS = frozenset(
    {("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                                     "int", "float", "bool")}
    | {("collections", "OrderedDict"), ("types", "SimpleNamespace")}
    | {("torch", name) for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
    | {("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch", "UntypedStorage"),
       ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"),
       ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2")}
    | {("torch.multiprocessing.reductions", name) for name in ("rebuild_tensor", "rebuild_typed_storage",
                                                               "rebuild_storage_filename", "rebuild_storage_empty")}
)
_EXPLAINED_GLOBALS = {
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"):
        "CPU tensors were shared by file descriptor, which an unrelated process cannot open; share them with "
        "torch.multiprocessing.set_sharing_strategy('file_system') (megatron_rl.rollout.weight_transport.dump_payload does)",
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
        "the payload holds CUDA tensors (CUDA-IPC handles), but this engine runs on CPU; send CPU tensors in "
        "shared memory, or serve the model with SGLang on the GPU",
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"):
        "the payload holds CUDA tensors (CUDA-IPC handles, SGLang's patched reductions), but this engine runs on "
        "CPU; send CPU tensors in shared memory, or serve the model with SGLang on the GPU",
}
_SUBSTITUTED_GLOBALS = {("torch.storage", "_load_from_bytes"): _torch_load_bytes}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if key in _SUBSTITUTED_GLOBALS:
            return _SUBSTITUTED_GLOBALS[key]
        if key in _EXPLAINED_GLOBALS:
            raise PayloadError(_EXPLAINED_GLOBALS[key])
        raise PayloadError(f"the payload needs the Python global {module}.{name}, which is not allowed: only builtin "
                           f"containers, types.SimpleNamespace, torch dtypes and torch's tensor rebuild functions are "
                           f"(build bucket metadata from types.SimpleNamespace, not from a class of your own)")


def load_payload(text: str | bytes) -> Any:
    """Decode one base64 payload with the restricted unpickler; raises PayloadError saying what is wrong."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise PayloadError(f"not valid base64 ({error})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except PayloadError:
        raise
    except Exception as error:  # a truncated stream, a shared-memory file that is gone, ...
        raise PayloadError(f"cannot unpickle it ({type(error).__name__}: {error})") from None


def named_tensors(payload: Any, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a loaded payload: a flattened bucket, or (load_format null) a list of pairs."""
    if load_format == FLATTENED_BUCKET:
        if not isinstance(payload, dict) or set(payload) != {"flattened_tensor", "metadata"}:
            raise PayloadError('a flattened_bucket payload must be a dict with exactly "flattened_tensor" and "metadata"')
        if not isinstance(payload["metadata"], (list, tuple)):
            raise PayloadError("metadata must be a list of entries")
        return unflatten(payload["flattened_tensor"], payload["metadata"])
    if not isinstance(payload, (list, tuple)) or not all(
            isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor) for item in payload):
        raise PayloadError("with load_format null the payload must be a list of (name, tensor) pairs")
    return [(name, tensor) for name, tensor in payload]


# ---------------------------------------------------------------------------------------------------
# Broadcast groups
# ---------------------------------------------------------------------------------------------------


def join_weights_update_group(master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
                              backend: str, timeout: timedelta) -> dist.ProcessGroup:
    """Join (rank 0: host) the group SGLang's `init_custom_process_group` builds; blocks until all ranks join."""
    from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {index: index for index in range(world_size)}  # group rank = rank in it
    return group


def leave_weights_update_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)


def receive_broadcast(group: dist.ProcessGroup, names: Sequence[str], dtypes: Sequence[str],
                      shapes: Sequence[Sequence[int]], load_format: str | None,
                      device: torch.device = torch.device("cpu")) -> list[tuple[str, torch.Tensor]]:
    """The engine side of one `update_weights_from_distributed`: receive the tensors group rank 0 broadcasts."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    for name, shape in zip(names, shapes):
        if any(dim < 0 for dim in shape):
            raise ValueError(f"negative dimension in the shape {list(shape)} of {name}")
    entries = [(name, dtype_from_name(dtype), shape) for name, dtype, shape in zip(names, dtypes, shapes)]
    if load_format == FLATTENED_BUCKET:
        metadata = layout(entries)
        buffer = torch.empty(metadata[-1].end_idx if metadata else 0, dtype=torch.uint8, device=device)
        dist.broadcast(buffer, group_src=0, group=group)
        return unflatten(buffer, metadata)
    if load_format is not None:
        raise ValueError(f"load_format {load_format!r} is not supported (use null or {FLATTENED_BUCKET!r})")
    tensors = [(name, torch.empty(tuple(shape), dtype=dtype, device=device)) for name, dtype, shape in entries]
    works = [dist.broadcast(tensor, group_src=0, group=group, async_op=True) for _, tensor in tensors]
    for work in works:
        work.wait()
    return tensors
