"""Trainer offload: give the trainer's device memory to the rollout engine between training phases.

Offload copies every parameter, fp32 master weight and optimizer state to pinned CPU memory and frees
the device storage; gradient buffers are freed without a copy (they are zeroed before each step).
It works on storages, not tensors: `untyped_storage().resize_(0)` frees the memory while every
tensor and view stays valid (megatron's `main_grad` views into its contiguous grad buffers, the
optimizer's references to parameters), and onload resizes the same storages and refills them, so
nothing needs re-pointing and no megatron internals are rebuilt.

On CPU there is no device memory to hand over: `train.offload` is off by default there (a no-op),
and forced on it runs the same code, which is how the tests check the round trip is bitwise exact.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class OffloadResult:
    bytes_copied: int  # to (offload) or from (onload) pinned CPU memory
    bytes_freed_or_restored: int  # device storage freed (offload) or allocated again (onload)
    seconds: float
    device_free_bytes: int | None = None  # torch.cuda.mem_get_info after the move, on GPU


def _storage_key(tensor: torch.Tensor) -> int:
    # The storage object's identity: its data pointer would change (to 0) once the storage is freed.
    return tensor.untyped_storage()._cdata


def _byte_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))


class TrainerOffload:
    """Offload/onload of one PolicyTrainer's state. Not collective: each rank moves its own."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._backups: dict[int, tuple[torch.UntypedStorage, torch.Tensor]] = {}
        self._freed: dict[int, tuple[torch.UntypedStorage, int]] = {}

    @property
    def offloaded(self) -> bool:
        return bool(self._backups or self._freed)

    def _kept_tensors(self) -> list[torch.Tensor]:
        """Tensors whose contents must survive: parameters, master weights, optimizer state."""
        tensors = list(self.trainer.ddp_model.parameters())
        optimizer = self.trainer.optimizer
        for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
            for group in inner.optimizer.param_groups:
                tensors.extend(group["params"])  # fp32 master copies when training in bf16
            for state in inner.optimizer.state.values():
                tensors.extend(value for value in state.values() if torch.is_tensor(value))
        return tensors

    def _gradient_tensors(self) -> list[torch.Tensor]:
        buffers = getattr(self.trainer.ddp_model, "buffers", []) + getattr(self.trainer.ddp_model, "expert_parallel_buffers", [])
        return [buffer.grad_data for buffer in buffers]

    def offload(self) -> OffloadResult:
        if self.offloaded:
            raise RuntimeError("the trainer is already offloaded")
        started = time.monotonic()
        copied = freed = 0
        pinned = torch.cuda.is_available()
        for tensor in self._kept_tensors():
            key = _storage_key(tensor)
            storage = tensor.untyped_storage()
            if key in self._backups or storage.nbytes() == 0:
                continue
            backup = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned)
            backup.copy_(_byte_view(storage), non_blocking=pinned)
            self._backups[key] = (storage, backup)
            copied += storage.nbytes()
        for tensor in self._gradient_tensors():
            key = _storage_key(tensor)
            storage = tensor.untyped_storage()
            if key not in self._backups and key not in self._freed and storage.nbytes():
                self._freed[key] = (storage, storage.nbytes())
        if pinned:
            torch.cuda.synchronize()  # the copies must land before the storage goes
        for storage, backup in self._backups.values():
            freed += storage.nbytes()
            storage.resize_(0)
        for storage, size in self._freed.values():
            freed += size
            storage.resize_(0)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # freed storage returns to the caching allocator; the engine is another process
        return self._result(copied, freed, started)

    def onload(self) -> OffloadResult:
        if not self.offloaded:
            raise RuntimeError("the trainer is not offloaded")
        started = time.monotonic()
        copied = restored = 0
        for storage, backup in self._backups.values():
            storage.resize_(backup.numel())
            _byte_view(storage).copy_(backup, non_blocking=backup.is_pinned())
            copied += backup.numel()
            restored += backup.numel()
        for storage, size in self._freed.values():
            storage.resize_(size)
            _byte_view(storage).zero_()
            restored += size
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the pinned backups are freed next
        self._backups.clear()
        self._freed.clear()
        return self._result(copied, restored, started)

    def named_parameters(self):
        """The model's (name, parameter) pairs; while offloaded, CPU tensors over the pinned copies."""
        for name, parameter in self.trainer.model.named_parameters():
            backup = self._backups.get(_storage_key(parameter))
            if backup is None:
                yield name, parameter
                continue
            copy = torch.empty(0, dtype=parameter.dtype)
            copy.set_(backup[1].untyped_storage(), parameter.storage_offset(), parameter.shape, parameter.stride())
            yield name, copy

    @staticmethod
    def _result(copied: int, moved: int, started: float) -> OffloadResult:
        free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
        return OffloadResult(copied, moved, time.monotonic() - started, free)
