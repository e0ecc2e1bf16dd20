"""Apple GPUs through Metal Performance Shaders (torch.mps). One GPU per machine.

Written against torch's documented torch.mps API; not run on a Mac in this repo.
"""

from __future__ import annotations

import platform
import subprocess
from types import ModuleType

import torch

from .base import Device, check_rng_state, probe_fused_adamw
from .flops import table_peak_flops


class MpsDevice(Device):
    """Apple's GPU. It has no collective backend, no peak-memory counter and no float64.

    Every local rank gets the one GPU; torch has no MPS collectives, so `dist_backend` is "cpu:gloo"
    and only single-process training runs on MPS (gloo cannot reduce MPS tensors).
    """

    type = "mps"

    def __init__(self) -> None:
        self._fused_adamw: bool | None = None
        self._bf16: bool | None = None
        self._peak_seen = 0
        self._name: str | None = None

    @classmethod
    def _module(cls) -> ModuleType:
        return torch.mps

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.backends.mps.is_available():
            return None
        return "torch.backends.mps.is_available() is False (needs Apple silicon, macOS 12.3+ and an MPS build)"

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device("mps")

    def set_current(self, local_rank: int) -> None:
        pass  # one GPU: nothing to choose

    def device_count(self) -> int:
        return int(self._module().device_count())

    @property
    def dist_backend(self) -> str:
        return "cpu:gloo"

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        if dtype in (torch.float32, torch.float16):
            return True
        if dtype == torch.bfloat16:
            return self._bf16_works()
        return False  # float64 does not exist on MPS; other dtypes are not training dtypes

    def _bf16_works(self) -> bool:
        """Conservative: macOS 14+ and a bf16 matmul that actually runs on this machine."""
        if self._bf16 is None:
            self._bf16 = False
            if torch.backends.mps.is_macos_or_newer(14, 0):
                try:
                    x = torch.ones(2, 2, dtype=torch.bfloat16, device="mps")
                    self._bf16 = bool((x @ x).float().sum().item() == 8.0)
                except (RuntimeError, TypeError):
                    pass
        return self._bf16

    def fused_adamw(self) -> bool:
        if self._fused_adamw is None:
            self._fused_adamw = probe_fused_adamw(torch.device("mps"))
        return self._fused_adamw

    def synchronize(self) -> None:
        self._module().synchronize()

    def memory_stats(self) -> dict[str, int]:
        """Bytes of live tensors ("allocated") and of Metal driver memory of this process ("reserved").

        MPS has no peak counter: "peak_allocated" is the largest "allocated" that memory_stats() itself has
        seen since reset_peak_memory(), a lower bound on the true peak.
        """
        allocated = int(self._module().current_allocated_memory())
        self._peak_seen = max(self._peak_seen, allocated)
        return {
            "allocated": allocated,
            "reserved": int(self._module().driver_allocated_memory()),
            "peak_allocated": self._peak_seen,
        }

    def reset_peak_memory(self) -> None:
        self._peak_seen = 0

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._module().manual_seed(seed)

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state(), "mps": self._module().get_rng_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        check_rng_state(state, ("cpu", "mps"))
        torch.set_rng_state(state["cpu"])
        self._module().set_rng_state(state["mps"])

    def name(self) -> str:
        """The chip, e.g. "Apple M2 Max" (the GPU is part of it); "Apple GPU (MPS)" if macOS does not say."""
        if self._name is None:
            self._name = _apple_chip_name()
        return self._name

    def peak_flops(self, dtype: torch.dtype) -> float | None:
        # Apple publishes no per-dtype peak for its GPUs: the table has no Apple rows, so this is None.
        return table_peak_flops(self.name(), dtype)


def _apple_chip_name() -> str:
    if platform.system() == "Darwin":
        try:
            command = ["sysctl", "-n", "machdep.cpu.brand_string"]
            out = subprocess.run(command, capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "Apple GPU (MPS)"
