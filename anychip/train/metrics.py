"""What a step logs beside its objective's figures: learning rate, gradient norm, time,
tokens/s, MFU against the device's peak, expert imbalance and peak memory; and the line
the terminal shows."""

from __future__ import annotations

import contextlib
import socket
import time

import torch

from .step import Work


class StepMeter:
    def __init__(self, core, device, world, amp):
        self.device, self.world = device, world
        self.peak = job_peak(device, amp or torch.float32, world)
        self.moe_names = core.moe_layer_names()
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def measure(self, figures: dict, work: Work, lr: float, grad_norm: float, loads: torch.Tensor, extra: dict) -> dict:
        """The step's metrics; waits for the device so that the step time is the device's."""
        self.device.synchronize()
        dt = time.perf_counter() - self.t0
        return {
            **figures,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": dt,
            "tokens_per_s": work.tokens / dt,
            "mfu": work.flops / dt / (self.peak * self.world.world_size) if self.peak else None,
            "expert_imbalance": imbalance(loads),
            "memory_peak_gb": self.device.memory_stats()["peak_allocated"] / 2**30,
            **extra,  # from guards, for this step
        }


def job_peak(device, dtype: torch.dtype, world) -> float | None:
    """The device's peak FLOP/s at ``dtype`` (``device.peak_flops``: a timed matmul, 0.6 s on a
    small CPU), measured once per host, device and thread count for the job and kept in the
    job's store: a worker started again later (alone, or in its process) reads it, with no
    matmul in its start-up and the same reference for the MFU of every start."""
    store = world.job_store
    if store is None:
        return device.peak_flops(dtype)
    key = f"peak_flops/{socket.gethostname()}/{device.name()}/{dtype}/{torch.get_num_threads()}"
    with contextlib.suppress(Exception):  # a store that does not answer: measure here
        if store.check([key]):
            return float(store.get(key)) or None
    peak = device.peak_flops(dtype)
    with contextlib.suppress(Exception):
        store.set(key, str(peak or 0.0))
    return peak


def imbalance(loads: torch.Tensor) -> float:
    """The largest ratio of an expert's tokens to its layer's mean (1.0: perfectly balanced)."""
    if loads.numel() == 0:
        return 1.0
    mean = loads.mean(dim=1).clamp(min=1e-9)
    return float((loads.max(dim=1).values / mean).max())


def console_line(step: int, headline: str, m: dict) -> str:
    """The terminal line of a step: the objective's ``headline``, then speed and balance."""
    mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
    heldout = f"  held-out {m['eval_loss']:.4f}" if "eval_loss" in m else ""
    return (
        f"step {step:5d}  {headline}  lr {m['lr']:.2e}  grad {m['grad_norm']:.2f}  {m['tokens_per_s']:,.0f} tok/s  "
        f"MFU {mfu}  experts max/mean {m['expert_imbalance']:.2f}{heldout}"
    )
