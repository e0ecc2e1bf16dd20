"""The device seam: one abstract `Device`, one small subclass per vendor.

Only the calls anychip makes are here (DeepSpeed's accelerator idea, without its 80 methods). Every
method is abstract, so a vendor class that forgets one cannot be instantiated; tests/test_device.py
instantiates every vendor class with its vendor module mocked, so that shows up on CPU CI.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from ..errors import DeviceError

# The dtypes `supports_dtype` answers for; any other dtype is answered False.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Device(abc.ABC):
    """One kind of compute device, as the training loop sees it.

    A `Device` object stands for the device *type* (all visible CUDA GPUs, say); methods that act on one
    device act on the process's current one, which `set_current(local_rank)` chooses.
    """

    type: ClassVar[str]  # "cpu", "cuda", "npu", "xpu", "mps": the torch device type

    # -- selection ---------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when this device type can be used in this process, else why not (for error messages).

        Never raises for a device that is simply absent; raises `DeviceError` only when the vendor's
        software is installed but broken, so that a broken install is not silently skipped.
        """

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    # -- placement ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def torch_device(self, local_rank: int = 0) -> torch.device:
        """The torch.device for this local rank; raises DeviceError if no such device is visible."""

    @abc.abstractmethod
    def set_current(self, local_rank: int) -> None:
        """Make the device of this local rank the current one for this process (call once per worker)."""

    @abc.abstractmethod
    def device_count(self) -> int:
        """How many devices of this type this process can see."""

    @property
    @abc.abstractmethod
    def dist_backend(self) -> str:
        """The torch.distributed backend string, e.g. "cuda:nccl,cpu:gloo" (CPU tensors always use gloo)."""

    # -- numerics ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def supports_dtype(self, dtype: torch.dtype) -> bool:
        """Whether this device can train in `dtype` (float32/64, bfloat16, float16); other dtypes: False."""

    def autocast_dtype(self) -> torch.dtype | None:
        """The preferred low-precision autocast dtype: bfloat16 where supported, else None (no autocast)."""
        return torch.bfloat16 if self.supports_dtype(torch.bfloat16) else None

    def prepare_determinism(self, deterministic: bool = False) -> None:
        """Call once at the worker's start, before the first kernel: ready this device's deterministic
        kernels (the recompute audit turns them on around its recomputes) and set torch's deterministic
        algorithms for the process to ``deterministic`` (on: an op without a deterministic kernel raises
        rather than run nondeterministically). Vendors whose deterministic kernels need setting up before
        their first use override it; raises DeviceError where that setup conflicts with the environment."""
        torch.use_deterministic_algorithms(deterministic)

    @abc.abstractmethod
    def fused_adamw(self) -> bool:
        """Whether torch.optim.AdamW(fused=True) runs on this device (found by trying it once, then cached)."""

    # -- execution and memory ----------------------------------------------------------------------
    @abc.abstractmethod
    def synchronize(self) -> None:
        """Wait for all queued work on the current device to finish (for honest timings)."""

    @abc.abstractmethod
    def memory_stats(self) -> dict[str, int]:
        """Bytes: {"allocated", "reserved", "peak_allocated"} for the current device."""

    @abc.abstractmethod
    def reset_peak_memory(self) -> None:
        """Restart the window that "peak_allocated" covers."""

    def release_freed_memory(self) -> None:
        """Give memory that tensors freed back to the system where nothing else would: nothing on
        accelerators, whose caching allocators keep it for the next step on purpose."""
        return None

    # -- randomness --------------------------------------------------------------------------------
    @abc.abstractmethod
    def manual_seed(self, seed: int) -> None:
        """Seed the CPU generator and this device's generators."""

    @abc.abstractmethod
    def rng_state(self) -> dict[str, torch.Tensor]:
        """Generator states for a checkpoint: the CPU one under "cpu", the current device's under `type`."""

    @abc.abstractmethod
    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `rng_state` returned; raises DeviceError naming a missing or malformed entry.

        Entries for other device types are ignored (they cannot be restored here); a state without this
        device type's entry (saved on another kind of device) is an error, so a resume that cannot be
        bit-exact never passes for one: the caller decides to reseed and records it.
        """

    # -- identity and speed ------------------------------------------------------------------------
    @abc.abstractmethod
    def name(self) -> str:
        """The product name of the current device, e.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC 7763"."""

    @abc.abstractmethod
    def peak_flops(self, dtype: torch.dtype) -> float | None:
        """Dense peak FLOP/s of one device at `dtype`, or None when unknown (report MFU as n/a)."""

    def peak_bandwidth(self) -> float | None:
        """Peak memory bandwidth of one device in bytes/s, or None when unknown (from the device table)."""
        from .flops import table_peak_bandwidth

        return table_peak_bandwidth(self.name())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.type!r})"


def check_rng_state(state: dict[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    """Raise DeviceError unless `state` holds a CPU uint8 tensor under each of `keys`."""
    if not isinstance(state, dict):
        raise DeviceError(f"rng state must be a dict of tensors keyed by device type, got {type(state).__name__}")
    for key in keys:
        if key not in state:
            raise DeviceError(
                f"rng state has no {key!r} entry (it has {sorted(state)}): it was saved on another kind of "
                f"device, so this run cannot resume its random stream bit-exactly; reseed instead"
            )
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            got = f"tensor of {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise DeviceError(f"rng state entry {key!r} must be a uint8 tensor, got {got}")


def probe_fused_adamw(device: torch.device) -> bool:
    """Try one fused AdamW step on a 4-element parameter on `device`; True if it runs and gives finite values."""
    try:
        param = torch.zeros(4, device=device, requires_grad=True)
        param.grad = torch.ones_like(param)
        torch.optim.AdamW([param], lr=1e-3, fused=True).step()
        return bool(torch.isfinite(param).all()) and bool((param != 0).all())
    except (RuntimeError, NotImplementedError, ValueError, TypeError, AssertionError):
        return False  # torch raises AssertionError for a device type it was built without
