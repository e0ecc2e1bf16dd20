"""NVIDIA GPUs, and AMD GPUs through ROCm builds of torch (which expose them as torch.cuda).

Written against torch's documented torch.cuda API; not run on a GPU in this repo.
"""

from __future__ import annotations

import os

import torch

from ..errors import DeviceError
from .accelerator import TorchAccelerator

# cuBLAS GEMMs are deterministic only with a fixed workspace layout (torch accepts these two); cuBLAS reads
# the variable when its first handle is made, so it must be set before the first GEMM of the process
CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"
DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")


class CudaDevice(TorchAccelerator):
    type = "cuda"
    visible_devices_env = "CUDA_VISIBLE_DEVICES"  # ROCm also honours HIP_VISIBLE_DEVICES

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if cls._module().is_available():
            return None
        build = f"ROCm {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        if torch.version.hip or torch.version.cuda:
            return f"torch.cuda.is_available() is False (torch {torch.__version__} with {build}: no GPU visible?)"
        return f"this torch {torch.__version__} is built without CUDA or ROCm"

    @property
    def dist_backend(self) -> str:
        return "cuda:nccl,cpu:gloo"  # on ROCm, "nccl" is RCCL

    def prepare_determinism(self, deterministic: bool = False) -> None:
        """Also pins cuBLAS's workspace (":4096:8", 8 buffers of 4 MiB) unless $CUBLAS_WORKSPACE_CONFIG
        says otherwise; with ``deterministic``, a value that is not a deterministic layout is a DeviceError."""
        value = os.environ.setdefault(CUBLAS_WORKSPACE, DETERMINISTIC_WORKSPACES[0])
        if deterministic and value not in DETERMINISTIC_WORKSPACES:
            raise DeviceError(
                f"train.deterministic = true needs {CUBLAS_WORKSPACE} = {' or '.join(DETERMINISTIC_WORKSPACES)} "
                f"(deterministic cuBLAS), but the environment sets it to {value!r}"
            )
        super().prepare_determinism(deterministic)

    def _supports(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            # Native bf16 only (Ampere and newer, every ROCm GPU): emulated bf16 is too slow to train in.
            return bool(self._module().is_bf16_supported(including_emulation=False))
        return True  # float16 and float64 run on every CUDA and ROCm GPU torch supports
