"""Huawei Ascend NPUs through torch_npu, which adds torch.npu with the torch.cuda-shaped API.

torch_npu is imported only when this device is probed or selected (it patches torch on import).
Written against torch_npu's documented API; not run on an Ascend NPU in this repo.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch

from ..errors import DeviceError
from .accelerator import TorchAccelerator


class NpuDevice(TorchAccelerator):
    type = "npu"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"

    @classmethod
    def _module(cls) -> ModuleType:
        if not _import_torch_npu():
            raise DeviceError("the npu device needs torch_npu, which is not installed")
        return torch.npu

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not _import_torch_npu():
            return "torch_npu is not installed (it must match this torch and the installed CANN)"
        if cls._module().is_available():
            return None
        return "torch.npu.is_available() is False (no NPU visible, or the driver is not loaded)"

    @property
    def dist_backend(self) -> str:
        return "npu:hccl,cpu:gloo"

    def _supports(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            return bool(self._module().is_bf16_supported())  # 910B and later; not the first 910
        # float16: yes. float64: no; the cube units have none and many ops fall back to the AI CPU.
        return dtype == torch.float16


def _import_torch_npu() -> bool:
    """Import torch_npu: False if it is not installed, DeviceError if it is installed but fails to import."""
    if sys.modules.get("torch_npu") is not None:
        return True
    if "torch_npu" in sys.modules or importlib.util.find_spec("torch_npu") is None:  # None entry: blocked
        return False
    try:
        importlib.import_module("torch_npu")
    except Exception as e:  # CANN libraries missing or mismatched: say so rather than skip the NPU
        raise DeviceError(f"torch_npu is installed but failed to import: {type(e).__name__}: {e}") from e
    return True
