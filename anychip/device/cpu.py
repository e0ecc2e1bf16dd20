"""The host CPU: always available, the reference device, and the one this repo's tests run on."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .base import FLOAT_DTYPES, Device, check_rng_state, probe_fused_adamw

# Measured matmul FLOP/s and copy bandwidth, keyed by (dtype or "copy", torch thread count): measured once per process.
_MEASURED: dict[tuple[torch.dtype | str, int], float] = {}


class CpuDevice(Device):
    """The CPU. `local_rank` is ignored: every worker on a node shares the host (gloo does the collectives)."""

    type = "cpu"

    def __init__(self) -> None:
        self._fused_adamw: bool | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None

    def torch_device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    def set_current(self, local_rank: int) -> None:
        pass  # nothing to choose: one host

    def device_count(self) -> int:
        return 1

    @property
    def dist_backend(self) -> str:
        return "cpu:gloo"

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        # All four work; float16 matmul can be very slow without AVX512-FP16/AMX-FP16 (0.4 GFLOP/s on
        # the AMD EPYC this was written on, against ~190 for bfloat16): `peak_flops` shows it.
        return dtype in FLOAT_DTYPES

    def fused_adamw(self) -> bool:
        if self._fused_adamw is None:
            self._fused_adamw = probe_fused_adamw(torch.device("cpu"))
        return self._fused_adamw

    def synchronize(self) -> None:
        pass  # CPU ops run synchronously

    def memory_stats(self) -> dict[str, int]:
        """The process's memory, not only tensors' (the CPU has no caching allocator to ask).

        "allocated" and "reserved" are both the current resident set size (from /proc/self/statm);
        "peak_allocated" is the peak resident set size from resource.getrusage (since process start,
        or since `reset_peak_memory` where Linux allows resetting it). Without /proc (macOS) the
        current size is not known without psutil, and all three report the peak.
        """
        peak = _peak_rss()
        rss = _current_rss()
        current = peak if rss is None else rss
        return {"allocated": current, "reserved": current, "peak_allocated": max(peak, current)}

    def release_freed_memory(self) -> None:
        """glibc keeps the freed small blocks of its heaps mapped (a step's gradients, FSDP's
        gathered shards): ``malloc_trim`` returns them, so the resident set between steps is the
        live tensors. Elsewhere (no glibc) nothing happens."""
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def reset_peak_memory(self) -> None:
        """Reset the peak resident set size (Linux 4.0+, via /proc/self/clear_refs); elsewhere this is a
        no-op and "peak_allocated" stays the peak since process start."""
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        check_rng_state(state, ("cpu",))
        torch.set_rng_state(state["cpu"])

    def name(self) -> str:
        """The CPU model from /proc/cpuinfo (Linux x86), else platform.processor(), else "cpu"."""
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
        except OSError:
            pass
        return platform.processor() or "cpu"

    def peak_flops(self, dtype: torch.dtype) -> float | None:
        """Measured, not a datasheet figure: the best of 3-10 timed square matmuls at `dtype` after a warm-up,
        in the faster of the layouts A @ A and A @ A^T, with torch's current thread count, cached per (dtype, thread count) for this process.

        The matrices are 2048x2048 unless the dtype is so slow here that one 2048 matmul would take
        seconds (float16 without hardware support): then the largest of 256/512/1024 whose next size
        up would pass half a second. None for dtypes other than float32/64, bfloat16, float16.
        """
        if dtype not in FLOAT_DTYPES:
            return None
        key = (dtype, torch.get_num_threads())
        if key not in _MEASURED:
            _MEASURED[key] = _measure_matmul_flops(dtype)
        return _MEASURED[key]

    def peak_bandwidth(self) -> float | None:
        """Measured: the best of 3 copies of a 256 MiB float32 tensor (bytes read + written per second),
        with torch's current thread count, cached per thread count for this process."""
        key = ("copy", torch.get_num_threads())
        if key not in _MEASURED:
            _MEASURED[key] = _measure_copy_bandwidth()
        return _MEASURED[key]


def _measure_copy_bandwidth(mib: int = 256) -> float:
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: touches every page
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best  # read + write


def _measure_matmul_flops(dtype: torch.dtype, max_n: int = 2048, budget_s: float = 0.5) -> float:
    def timed_matmul(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
        start = time.perf_counter()
        torch.mm(a, (a if plain else a.t()) if b is None else b)
        return time.perf_counter() - start

    n = 256
    a = torch.randn(n, n).to(dtype)
    # the faster layout of the second operand: A @ A, or A @ A^T (nn.Linear's; 10x faster for float16
    # on some CPUs)
    timed_matmul(a, a)
    plain = timed_matmul(a, a) <= timed_matmul(a, a.t())
    seconds = timed_matmul(a)  # warm-up at each size; it also tells whether the next size fits the budget
    while n < max_n and seconds * 8 <= budget_s:
        n *= 2
        a = torch.randn(n, n).to(dtype)
        seconds = timed_matmul(a)
    times = [timed_matmul(a) for _ in range(3)]
    while len(times) < 10 and sum(times) < budget_s:  # more tries where they are cheap: one slow moment
        times.append(timed_matmul(a))  # must not lower the peak
    return 2 * n**3 / min(times)


def _current_rss() -> int | None:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """The peak resident set size of this process's memory: VmHWM where Linux gives it (reset by
    ``reset_peak_memory``; ``ru_maxrss`` is not, and a process started from a larger one
    inherits that one's maximum), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource  # not on Windows
    except ImportError:
        return 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()
