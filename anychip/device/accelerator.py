"""What CUDA, Ascend NPU and Intel XPU share: a torch device module with the torch.cuda-shaped API.

`torch.cuda`, `torch.xpu` and (once torch_npu is imported) `torch.npu` all offer device_count,
set_device, current_device, synchronize, memory_allocated, memory_reserved, max_memory_allocated,
reset_peak_memory_stats, get/set_rng_state, manual_seed_all and get_device_name. This class calls
exactly those, through `_module()`, which tests replace with a mock.

Why not `torch.accelerator`: it addresses only the one accelerator torch was built for, and its
memory functions are newer than the torch 2.6 that pyproject allows; the device modules give the
same calls on every supported torch and can be mocked vendor by vendor.
"""

from __future__ import annotations

import abc
import os
from types import ModuleType
from typing import ClassVar

import torch

from ..errors import DeviceError
from .base import FLOAT_DTYPES, Device, check_rng_state, probe_fused_adamw
from .flops import table_peak_flops


class TorchAccelerator(Device):
    """A device reached through `torch.<type>`; subclasses name the type, backend and dtype rules."""

    visible_devices_env: ClassVar[str]  # the variable that restricts which devices a process sees

    def __init__(self) -> None:
        self._fused_adamw: bool | None = None

    @classmethod
    def _module(cls) -> ModuleType:
        """The vendor's torch module (torch.cuda, torch.npu, torch.xpu)."""
        return getattr(torch, cls.type)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if cls._module().is_available():
            return None
        return f"torch.{cls.type}.is_available() is False"

    def _index(self) -> int:
        return int(self._module().current_device())

    def _check_rank(self, local_rank: int) -> None:
        count = self.device_count()
        if not 0 <= local_rank < count:
            env = self.visible_devices_env
            raise DeviceError(
                f"local_rank {local_rank} has no {self.type} device: this process sees {count} "
                f"({env}={os.environ.get(env, '<unset>')}); start at most {count} workers per node"
            )

    def torch_device(self, local_rank: int = 0) -> torch.device:
        self._check_rank(local_rank)
        return torch.device(self.type, local_rank)

    def set_current(self, local_rank: int) -> None:
        self._check_rank(local_rank)
        self._module().set_device(local_rank)

    def device_count(self) -> int:
        return int(self._module().device_count())

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if dtype == torch.float32:
            return True
        if dtype not in FLOAT_DTYPES:
            return False
        return self._supports(dtype)

    @abc.abstractmethod
    def _supports(self, dtype: torch.dtype) -> bool:
        """bfloat16, float16 or float64 support on this vendor's current device."""

    def fused_adamw(self) -> bool:
        if self._fused_adamw is None:
            self._fused_adamw = probe_fused_adamw(torch.device(self.type, self._index()))
        return self._fused_adamw

    def synchronize(self) -> None:
        self._module().synchronize()

    def memory_stats(self) -> dict[str, int]:
        module, index = self._module(), self._index()
        return {
            "allocated": int(module.memory_allocated(index)),
            "reserved": int(module.memory_reserved(index)),
            "peak_allocated": int(module.max_memory_allocated(index)),
        }

    def reset_peak_memory(self) -> None:
        self._module().reset_peak_memory_stats(self._index())

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._module().manual_seed_all(seed)

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state(), self.type: self._module().get_rng_state(self._index())}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        check_rng_state(state, ("cpu", self.type))
        torch.set_rng_state(state["cpu"])
        self._module().set_rng_state(state[self.type], self._index())

    def name(self) -> str:
        return str(self._module().get_device_name(self._index()))

    def peak_flops(self, dtype: torch.dtype) -> float | None:
        return table_peak_flops(self.name(), dtype)
