"""Run the op suite on a target and a reference device: errors against float64, speed, verdicts."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from ..device import Device
from ..models.deepseek.args import ModelArgs
from . import options
from .faults import inject
from .numerics import error_ratio, errors, float64_truth, judge
from .ops import Shape, cases, expert_agreement

DTYPE_NAMES = {getattr(torch, name): name for name in options.DTYPE_NAMES}  # torch.float32 -> "float32"


def run_ops(
    target: Device,
    reference: Device,
    args: ModelArgs,
    shape: Shape,
    dtypes: tuple[torch.dtype, ...],
    fault: tuple[str, float] | None = None,
    seed: int = 0,
    only: tuple[str, ...] = (),
    time_budget_s: float = 0.2,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per (op, dtype) the target supports: target and reference errors against the float64 CPU
    truth, their ratio, the verdict, and each device's time and throughput. `fault` is injected into the
    target's computations only. Ops in `only` (names) restrict the suite."""
    t_dev, r_dev = target.torch_device(), reference.torch_device()
    rows = []
    suite = cases(args, fused_adamw=target.fused_adamw())
    unknown = set(only) - {c.name for c in suite}
    if unknown:
        raise ValueError(
            f"unknown op(s) {', '.join(sorted(unknown))}; the suite has {', '.join(c.name for c in suite)}"
        )
    ref_suite = cases(args, fused_adamw=reference.fused_adamw())  # AdamW as training on the reference
    for case, ref_case in zip(suite, ref_suite, strict=True):
        if only and case.name not in only:
            continue
        gen = torch.Generator().manual_seed(seed)
        inputs64 = case.make(args, shape, gen)
        for dtype in case.dtypes:
            if dtype not in dtypes or not (target.supports_dtype(dtype) and reference.supports_dtype(dtype)):
                continue
            rounded = [_round(x, dtype, i in case.keep_fp32) for i, x in enumerate(inputs64)]
            with torch.enable_grad(), float64_truth():  # backward ops make their own leaves
                truth = case.run(*[x.to(torch.float64) if x.is_floating_point() else x for x in rounded])
            with inject(fault):
                got, t_time = _run_timed(case.run, rounded, target, t_dev, time_budget_s)
            want, r_time = _run_timed(ref_case.run, rounded, reference, r_dev, time_budget_s)
            row = _row(case, dtype, args, shape, rounded, truth, got, want, target, reference, t_time, r_time)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def _round(x: torch.Tensor, dtype: torch.dtype, keep_fp32: bool) -> torch.Tensor:
    if not x.is_floating_point():
        return x
    return x.to(torch.float32 if keep_fp32 or dtype == torch.float32 else dtype)


def _run_timed(fn, inputs, device: Device, where: torch.device, budget_s: float):
    """(result of the first call, median seconds of the timed calls after it)."""
    on_device = [x.to(where) for x in inputs]
    with torch.enable_grad():
        out = tuple(t.detach() for t in fn(*on_device))
        device.synchronize()
        times: list[float] = []
        while len(times) < 3 or (sum(times) < budget_s and len(times) < 50):
            start = time.perf_counter()
            fn(*on_device)
            device.synchronize()
            times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def _row(case, dtype, args, shape, rounded, truth, got, want, target, reference, t_time, r_time) -> dict:
    agreement = None
    if case.routing:  # which experts were chosen; gate values compared only where the choice agrees
        same_t, same_r = expert_agreement(got[2], truth[2]), expert_agreement(want[2], truth[2])
        agreement = float(same_t.double().mean())
        t_err = errors((got[0], got[1][same_t.to(got[1].device)]), (truth[0], truth[1][same_t]))
        r_err = errors((want[0], want[1][same_r.to(want[1].device)]), (truth[0], truth[1][same_r]))
    elif case.delta:  # an update: compare the change, which is small next to the input itself
        base = rounded[0].to(torch.float64)
        t_err = errors(got[0].cpu().double() - base, truth[0] - base)
        r_err = errors(want[0].cpu().double() - base, truth[0] - base)
    else:
        t_err, r_err = errors(got, truth), errors(want, truth)
    ratio = error_ratio(t_err.rel_rms, r_err.rel_rms, dtype)
    status, reason = judge(t_err, ratio, dtype, agreement)
    work = float(case.work(args, shape, dtype))
    return {
        "op": case.name,
        "dtype": DTYPE_NAMES[dtype],
        "what": case.what,
        "status": status,
        "reason": reason,
        "target": asdict(t_err),
        "reference": asdict(r_err),
        "error_ratio": ratio,
        "expert_agreement": agreement,
        "unit": case.unit,
        "work": work,
        "target_speed": _speed(work, case.unit, t_time, target, dtype),
        "reference_speed": _speed(work, case.unit, r_time, reference, dtype),
    }


def _speed(work: float, unit: str, seconds: float, device: Device, dtype: torch.dtype) -> dict:
    rate = work / seconds if seconds > 0 else float("inf")
    peak = device.peak_flops(dtype) if unit == "FLOP" else device.peak_bandwidth()
    return {
        "seconds": seconds,
        "rate": rate,
        "rate_unit": "TFLOP/s" if unit == "FLOP" else "GB/s",
        "rate_value": rate / (1e12 if unit == "FLOP" else 1e9),
        "peak_pct": 100 * rate / peak if peak else None,
    }
