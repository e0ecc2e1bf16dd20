"""NVIDIA GPUs, and AMD GPUs through ROCm builds of torch (which expose them as torch.cuda).

Written against torch's documented torch.cuda API; not run on a GPU in this repo.
"""

from __future__ import annotations

import torch

from .accelerator import TorchAccelerator


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

    def _supports(self, dtype: torch.dtype) -> bool:
        if dtype == torch.bfloat16:
            # Native bf16 only (Ampere and newer, every ROCm GPU): emulated bf16 is too slow to train in.
            return bool(self._module().is_bf16_supported(including_emulation=False))
        return True  # float16 and float64 run on every CUDA and ROCm GPU torch supports
