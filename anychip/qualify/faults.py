"""Deliberately wrong operations, to show that the checks catch them (``anychip qualify --inject``).

`inject("softmax", 1e-3)` perturbs the result of every softmax called while it is active, whichever
way the code calls it (``torch.softmax``, ``F.softmax``, ``x.softmax``), through a TorchFunctionMode:
y -> y * (1 + rel * n) with n a fixed pattern of +-1. qualify activates it for the target device's
computations only, as a chip with a bad kernel would behave; the op suite must then fail the op and step
parity must name the first layer that uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The functions each injectable operation covers.
OPS: dict[str, tuple[Callable, ...]] = {
    "matmul": (
        torch.matmul,
        torch.mm,
        torch.bmm,
        F.linear,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.mm,
        torch.Tensor.bmm,
        torch.einsum,
    ),
    "softmax": (torch.softmax, F.softmax, torch.Tensor.softmax),
    "sigmoid": (torch.sigmoid, F.sigmoid, torch.Tensor.sigmoid),
    "silu": (F.silu,),
    "rms_norm": (F.rms_norm,),
    "sdpa": (F.scaled_dot_product_attention,),
    "cross_entropy": (F.cross_entropy,),
}


class _Perturb(TorchFunctionMode):
    def __init__(self, funcs: tuple[Callable, ...], rel: float):
        super().__init__()
        self.funcs, self.rel = funcs, rel

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.funcs and isinstance(out, torch.Tensor) and out.is_floating_point():
            flat = torch.arange(out.numel(), device=out.device)
            signs = (((flat * 2654435761) >> 7) % 2 * 2 - 1).view(out.shape).to(out.dtype)  # fixed +-1
            out = out * (1 + self.rel * signs)
        return out


def parse(spec: str | None) -> tuple[str, float] | None:
    """ "softmax" or "softmax:1e-3" -> ("softmax", 1e-3); None stays None. ValueError names what is wrong."""
    if not spec:
        return None
    name, _, rel = spec.partition(":")
    if name not in OPS:
        raise ValueError(f"--inject {spec!r}: unknown operation {name!r}; choose one of {', '.join(OPS)}")
    try:
        value = float(rel) if rel else 1e-2
    except ValueError:
        raise ValueError(f"--inject {spec!r}: {rel!r} is not a relative error (e.g. softmax:1e-3)") from None
    if not 0 < value < 1:
        raise ValueError(f"--inject {spec!r}: the relative error must be in (0, 1), got {value}")
    return name, value


@contextmanager
def inject(fault: tuple[str, float] | None) -> Iterator[None]:
    """While active, the named operation's results carry the relative error; None: no fault."""
    if fault is None:
        with nullcontext():
            yield
        return
    name, rel = fault
    with _Perturb(OPS[name], rel):
        yield
