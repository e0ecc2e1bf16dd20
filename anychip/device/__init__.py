"""The device layer: the only place in anychip that knows vendor names.

    device = get_device()              # explicit name, else $ANYCHIP_DEVICE, else "auto"
    device.set_current(local_rank)
    dist.init_process_group(device.dist_backend)
    model.to(device.torch_device(local_rank))

"auto" takes the first available of cuda, npu, xpu, mps, cpu. A device asked for by name (argument or
ANYCHIP_DEVICE) that is not available is an error naming it and what is available: never a silent
fall-back.

Hardware actually run: only the CPU (torch 2.13.0 CPU build, x86-64 Linux). The CUDA (NVIDIA, and AMD
through ROCm builds), NPU (Huawei Ascend, torch_npu), XPU (Intel) and MPS (Apple) classes are written
against their documented torch APIs and are untested on real hardware in this repo; tests/test_device.py
runs them with the vendor modules mocked.
"""

from __future__ import annotations

import os

from ..errors import DeviceError
from .base import Device
from .cpu import CpuDevice
from .cuda import CudaDevice
from .mps import MpsDevice
from .npu import NpuDevice
from .xpu import XpuDevice

__all__ = ["Device", "DeviceError", "available_devices", "get_device"]

ENV_VAR = "ANYCHIP_DEVICE"
# "auto" tries these in order; cpu is always available, so auto always finds one.
DEVICES: dict[str, type[Device]] = {
    "cuda": CudaDevice,
    "npu": NpuDevice,
    "xpu": XpuDevice,
    "mps": MpsDevice,
    "cpu": CpuDevice,
}
NAMES = ("auto", *DEVICES)


def available_devices() -> list[str]:
    """The device types usable in this process, in auto-detection order; always ends with "cpu".

    Probing "npu" imports torch_npu when it is installed; a torch_npu that is installed but fails to
    import raises DeviceError rather than being skipped.
    """
    return [name for name, cls in DEVICES.items() if cls.is_available()]


def get_device(name: str | None = None) -> Device:
    """The device to train on: `name` if given, else $ANYCHIP_DEVICE if set and non-empty, else "auto".

    Raises DeviceError for a name that is not one of auto, cuda, npu, xpu, mps, cpu, and for a named
    device that is not available here (the message says why, and which devices are available).
    """
    if name is not None:
        requested, source = name, "requested"
    elif os.environ.get(ENV_VAR, "").strip():
        requested, source = os.environ[ENV_VAR], f"requested by {ENV_VAR}"
    else:
        requested, source = "auto", "auto"
    key = requested.strip().lower()
    if key not in NAMES:
        raise DeviceError(f"unknown device {requested!r} ({source}); expected one of: {', '.join(NAMES)}")
    if key == "auto":
        return next(cls() for cls in DEVICES.values() if cls.is_available())  # cpu always is
    cls = DEVICES[key]
    reason = cls.unavailable_reason()
    if reason is not None:
        raise DeviceError(
            f"device {key!r} was {source} but is not available: {reason}; "
            f"available here: {', '.join(available_devices())}"
        )
    return cls()
