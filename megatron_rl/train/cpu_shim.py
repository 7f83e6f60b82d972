"""Maps megatron-core's CUDA-only calls to the CPU so the real megatron-core code runs on CPU (gloo).

Used only when CUDA is absent (laptops, CI). Each patch is named and can be switched off with
`MEGATRON_RL_SHIM_SKIP=name[,name]`, so a test can show that it is needed. Why each exists:

- current_device: weights, RoPE's inv_freq, p2p and DDP buffers are placed on current_device().
- rng: model_parallel_cuda_manual_seed and the RNG tracker's fork read/write the CUDA generator.
- synchronize: p2p communication, DDP and dist_checkpointing's preload call it.
- tensor_cuda: tied embeddings with PP>1 and broadcast_data call Tensor.cuda().
- device_mode: schedules, the optimizer and grad clipping create small tensors on device="cuda".
- tensor_type: grad clipping and the optimizers check Tensor.type() for a torch.cuda.* name.
- quiet_rng_warning: CPU and "CUDA" RNG are one generator here, so megatron's warning about the
  CPU RNG changing inside the CUDA RNG context is expected noise.
"""
from __future__ import annotations

import logging
import os

import torch

_CPU = torch.device("cpu")
_applied: set[str] = set()


def _is_cuda_device(device: object) -> bool:
    return (
        isinstance(device, int)
        or (isinstance(device, str) and device.startswith("cuda"))
        or (isinstance(device, torch.device) and device.type == "cuda")
    )


class CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Rewrites a CUDA `device=` keyword of any torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return func(*args, **kwargs)


def _patch_current_device() -> None:
    torch.cuda.current_device = lambda: _CPU


def _patch_rng() -> None:
    import megatron.core.tensor_parallel.random as megatron_random

    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def _patch_synchronize() -> None:
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def _patch_device_mode() -> None:
    # Entered for good on the importing thread; modes are per thread, so worker threads that
    # call megatron must enter their own CudaToCpuMode.
    CudaToCpuMode().__enter__()


def _patch_tensor_type() -> None:
    original_type = torch.Tensor.type

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named_type


def _patch_quiet_rng_warning() -> None:
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)


PATCHES = {
    "current_device": _patch_current_device,
    "rng": _patch_rng,
    "synchronize": _patch_synchronize,
    "tensor_cuda": _patch_tensor_cuda,
    "device_mode": _patch_device_mode,
    "tensor_type": _patch_tensor_type,
    "quiet_rng_warning": _patch_quiet_rng_warning,
}


def apply_if_needed() -> list[str]:
    """Apply every patch not skipped, once per process, only when CUDA is absent; returns those applied."""
    if torch.cuda.is_available():
        return []
    skipped = {name.strip() for name in os.environ.get("MEGATRON_RL_SHIM_SKIP", "").split(",") if name.strip()}
    for name, patch in PATCHES.items():
        if name not in skipped and name not in _applied:
            patch()
            _applied.add(name)
    return sorted(_applied)
