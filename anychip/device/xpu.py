"""Intel GPUs (Data Center GPU Max, Arc) through torch.xpu.

Written against torch's documented torch.xpu API; not run on an Intel GPU in this repo.
"""

from __future__ import annotations

import torch

from .accelerator import TorchAccelerator


class XpuDevice(TorchAccelerator):
    type = "xpu"
    visible_devices_env = "ZE_AFFINITY_MASK"

    @property
    def dist_backend(self) -> str:
        # XCCL is built into torch since 2.8; older stacks used "ccl" from oneccl_bindings_for_pytorch.
        return "xpu:xccl,cpu:gloo"

    def _supports(self, dtype: torch.dtype) -> bool:
        module = self._module()
        if dtype == torch.bfloat16:
            try:
                return bool(module.is_bf16_supported(including_emulation=False))
            except TypeError:  # torch before the including_emulation argument
                return bool(module.is_bf16_supported())
        if dtype == torch.float64:
            return bool(module.get_device_properties(self._index()).has_fp64)  # Arc GPUs lack native fp64
        return True  # float16
