"""How far a result is from the float64 truth, and whether that is acceptable.

Every check compares a result computed on a device at some dtype with the same computation done in
float64 on the CPU *from the same rounded inputs*, so the error measured is the computation's, not the
rounding of its inputs. `float64_truth()` runs anychip's own code (the model's RMSNorm, router, experts)
in float64 although it casts to float32 internally in places.

The judged figure is the relative RMS error ||y - y*|| / ||y*||. A target passes when that error is
within its dtype's limits (`LIMITS`) *and* not much worse than the reference device's error on the same
check (`RATIO_LIMITS`): a chip is judged against what a good chip achieves, not against zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

PASS, WARN, FAIL = "pass", "warn", "fail"
_ORDER = {PASS: 0, WARN: 1, FAIL: 2}

# Relative RMS error against float64: (pass if <=, warn if <=, else fail), per compute dtype. The pass
# limit is 3-10x the worst error a correct CPU kernel showed on any check of the suite at that dtype, at
# tiny and v2-lite shapes (the CPU report cards in docs/qualify list them: float32 1.0e-6, bfloat16
# 4.6e-3, float16 2.3e-4), so an honest kernel passes and one with errors well above the dtype's
# rounding does not. Unit roundoff u for scale: float32 6.0e-8, bfloat16 3.9e-3, float16 4.9e-4.
LIMITS: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1.5e-2, 5e-2),
    torch.float16: (2e-3, 8e-3),
    torch.float64: (1e-13, 1e-12),
}
# Target error / reference error (each floored at a quarter of the dtype's unit roundoff, so two near-exact results
# do not make a large ratio): pass if <=, warn if <=, else fail.
RATIO_LIMITS = (4.0, 16.0)
UNIT_ROUNDOFF = {dtype: torch.finfo(dtype).eps / 2 for dtype in LIMITS}
# Router checks also compare which experts were chosen: share of tokens with the same expert set.
AGREEMENT_LIMITS = (0.999, 0.99)  # pass if >=, warn if >=, else fail


@dataclass
class Errors:
    """Error of one result against the float64 truth (all floats, JSON-ready)."""

    rel_rms: float  # ||y - y*|| / ||y*||: the judged figure
    max_abs: float
    max_rel: float  # max |y - y*| / max(|y*|, 1e-3 * rms(y*)): elements near zero do not dominate
    cosine: float
    within_0_1pct: float  # share of elements with |y - y*| <= 0.1% of max(|y*|, 1e-3 * rms(y*))
    within_0_5pct: float
    finite: bool


def errors(got: torch.Tensor | tuple[torch.Tensor, ...], truth: torch.Tensor | tuple[torch.Tensor, ...]) -> Errors:
    """Errors of `got` against `truth` (both on any device; compared in float64 on the CPU). For tuples
    of results (an output and its gradients), each figure is the worst over the parts."""
    if isinstance(got, tuple | list):
        parts = [errors(g, t) for g, t in zip(got, truth, strict=True)]
        return Errors(
            rel_rms=max(p.rel_rms for p in parts),
            max_abs=max(p.max_abs for p in parts),
            max_rel=max(p.max_rel for p in parts),
            cosine=min(p.cosine for p in parts),
            within_0_1pct=min(p.within_0_1pct for p in parts),
            within_0_5pct=min(p.within_0_5pct for p in parts),
            finite=all(p.finite for p in parts),
        )
    y = got.detach().to("cpu", torch.float64).flatten()
    t = truth.detach().to("cpu", torch.float64).flatten()
    if y.shape != t.shape:
        raise ValueError(f"result has {y.numel()} elements, truth {t.numel()}")
    finite = bool(torch.isfinite(y).all())
    if not finite:
        nan = float("nan")
        return Errors(math.inf, math.inf, math.inf, nan, 0.0, 0.0, False)
    diff = (y - t).abs()
    t_norm = float(t.norm())
    rms = t_norm / math.sqrt(max(t.numel(), 1))
    scale = t.abs().clamp(min=1e-3 * rms) if rms > 0 else torch.ones_like(t)
    rel = diff / scale
    denom = float(y.norm()) * t_norm
    return Errors(
        rel_rms=float(diff.norm()) / t_norm if t_norm > 0 else float(diff.norm()),
        max_abs=float(diff.max()) if diff.numel() else 0.0,
        max_rel=float(rel.max()) if rel.numel() else 0.0,
        cosine=float(y @ t) / denom if denom > 0 else float(diff.norm() == 0),
        within_0_1pct=float((rel <= 1e-3).double().mean()) if rel.numel() else 1.0,
        within_0_5pct=float((rel <= 5e-3).double().mean()) if rel.numel() else 1.0,
        finite=True,
    )


def error_ratio(target: float, reference: float, dtype: torch.dtype) -> float:
    """target / reference relative error, each floored at a quarter of the dtype's unit roundoff."""
    floor = UNIT_ROUNDOFF[dtype] / 4
    return max(target, floor) / max(reference, floor)


def judge(target: Errors, ratio: float, dtype: torch.dtype, agreement: float | None = None) -> tuple[str, str]:
    """(status, reason) of one check: the worst of the dtype limit, the ratio limit and, for routing,
    the expert-choice agreement. The reason names the figure that decided."""
    if not target.finite:
        return FAIL, "non-finite values in the result"
    ok, bad = LIMITS[dtype]
    verdicts = [(_grade(target.rel_rms, ok, bad), f"relative error {target.rel_rms:.2e} (limits {ok:.0e}/{bad:.0e})")]
    verdicts.append((grade_ratio(ratio), f"{ratio:.1f}x the reference's error"))
    if agreement is not None:
        low_ok, low_bad = AGREEMENT_LIMITS
        grade = PASS if agreement >= low_ok else WARN if agreement >= low_bad else FAIL
        verdicts.append((grade, f"same experts chosen for {agreement:.2%} of tokens"))
    status, reason = max(verdicts, key=lambda v: _ORDER[v[0]])
    return status, ("" if status == PASS else reason)


def worst(statuses) -> str:
    return max(statuses, key=_ORDER.__getitem__, default=PASS)


def grade_ratio(ratio: float) -> str:
    """pass / warn / fail of a target-to-reference error ratio (RATIO_LIMITS)."""
    return _grade(ratio, *RATIO_LIMITS)


def _grade(value: float, ok: float, bad: float) -> str:
    return PASS if value <= ok else WARN if value <= bad else FAIL


# -- float64 truth -------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class _Float64Mode(TorchFunctionMode):
    """Turns every request for a float32/bfloat16/float16 result into float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16):
            return args[0].to(torch.float64) if args[0].is_floating_point() else func(*args, **kwargs)
        if kwargs.get("dtype") in _FLOATS:
            kwargs["dtype"] = torch.float64
        if func in (torch.Tensor.to, torch.Tensor.type):
            args = tuple(torch.float64 if a in _FLOATS else a for a in args)
        return func(*args, **kwargs)


@contextmanager
def float64_truth() -> Iterator[None]:
    """Run anychip code in float64: explicit casts to lower float dtypes and factory functions given
    such a dtype produce float64, and the default dtype is float64. No autocast inside."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.autocast("cpu", enabled=False), _Float64Mode():
            yield
    finally:
        torch.set_default_dtype(previous)
