"""Collectives across the ranks of a qualify run: all-reduce, all-gather, reduce-scatter, all-to-all.

Every rank makes every rank's input from the same seed, so each can compute the float64 truth locally
(the sum over ranks in float64, or the exact gathered or exchanged data). Bandwidth is reported as bus
bandwidth, nccl-tests' convention, so that figures are comparable across world sizes.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..device import Device
from .numerics import error_ratio, errors, judge
from .suite import DTYPE_NAMES

# bus bandwidth = algorithm bandwidth x this factor (n ranks), as nccl-tests reports it
BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
}
# torch 2.13 renamed them (the old names warn); older torch has only the old names
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def run_collectives(
    target: Device,
    reference: Device,
    numel: int,
    dtypes: tuple[torch.dtype, ...],
    seed: int = 0,
    time_budget_s: float = 0.2,
) -> list[dict]:
    """One row per (collective, dtype) on this rank; the process group must hold both devices' backends."""
    rank, world = dist.get_rank(), dist.get_world_size()
    numel -= numel % world
    rows = []
    for dtype in dtypes:
        if not target.supports_dtype(dtype):
            continue
        gen = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype) for _ in range(world)]
        exact = [x.to(torch.float64) for x in inputs]
        chunk = numel // world
        truths = {
            "all_reduce": sum(exact),
            "all_gather": torch.cat(exact),
            "reduce_scatter": sum(exact)[rank * chunk : (rank + 1) * chunk],
            "all_to_all": torch.cat([x[rank * chunk : (rank + 1) * chunk] for x in exact]),
        }
        for name, truth in truths.items():
            got, t_time = _collective(name, inputs[rank], target, world, time_budget_s)
            want, r_time = _collective(name, inputs[rank], reference, world, time_budget_s)
            t_err, r_err = errors(got, truth), errors(want, truth)
            ratio = error_ratio(t_err.rel_rms, r_err.rel_rms, dtype)
            status, reason = judge(t_err, ratio, dtype)
            size = (numel * world if name == "all_gather" else numel) * inputs[rank].element_size()
            row = {
                "op": name,
                "dtype": DTYPE_NAMES[dtype],
                "what": f"{numel} elements per rank, {world} ranks",
                "status": status,
                "reason": reason,
                "target": asdict(t_err),
                "reference": asdict(r_err),
                "error_ratio": ratio,
                "expert_agreement": None,
                "unit": "B",
                "work": float(size),
                "target_speed": _bus(name, size, t_time, world),
                "reference_speed": _bus(name, size, r_time, world),
            }
            rows.append(row)
    return rows


def _collective(name: str, x: torch.Tensor, device: Device, world: int, budget_s: float):
    x = x.to(device.torch_device())

    def once() -> torch.Tensor:
        if name == "all_reduce":
            out = x.clone()
            dist.all_reduce(out)
        elif name == "all_gather":
            out = x.new_empty(x.numel() * world)
            _ALL_GATHER(out, x)
        elif name == "reduce_scatter":
            out = x.new_empty(x.numel() // world)
            _REDUCE_SCATTER(out, x)
        else:
            out = torch.empty_like(x)
            dist.all_to_all_single(out, x)
        return out

    out = once()  # warm-up, and the result that is judged
    device.synchronize()
    start = time.perf_counter()
    once()
    device.synchronize()
    # every rank must make the same calls: agree on one repetition count
    reps = torch.tensor([min(max(int(budget_s / max(time.perf_counter() - start, 1e-9)), 3), 50)])
    dist.all_reduce(reps, op=dist.ReduceOp.MIN)
    times = []
    for _ in range(int(reps)):
        dist.barrier()
        start = time.perf_counter()
        once()
        device.synchronize()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def _bus(name: str, size: int, seconds: float, world: int) -> dict:
    rate = size / seconds * BUS_FACTOR[name](world) if seconds > 0 else float("inf")
    return {"seconds": seconds, "rate": rate, "rate_unit": "GB/s (bus)", "rate_value": rate / 1e9, "peak_pct": None}
