"""One training step's gradients, whatever the loss: the micro-batch driver and the
``Objective`` interface its clients implement.

    counts = objective.counts(batch), summed over ranks     the normalisers of the global batch
                                                             (and over the pools of a run of pools)
    for each micro-batch (gradients synchronised on the last only):
        part = objective(forward, micro, counts)             forward: the model under autocast
        (part.loss * world size).backward()                  DDP and FSDP average over ranks
        sums += part.sums
    figures = objective.figures(sums summed over ranks (and pools), counts)

Each micro-batch contributes loss *sums* divided by the *global* counts, so micro-batches
and ranks add up to one big batch on one process. Clients: next-token prediction (SFT and
pretraining, ``anychip.train.lm``), the GRPO policy loss (``anychip.rl.policy``) and the
recompute audit (``anychip.guards.sdc``), which calls an objective on one micro-batch twice.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass

import torch

from ..device import Device
from ..parallel import World, all_reduce_sums, unwrap


@dataclass
class Part:
    """What an objective returns for one micro-batch."""

    loss: torch.Tensor
    """This micro-batch's share of the step's objective (already divided by the global counts)."""
    sums: dict[str, float]
    """Figures to add up over micro-batches and ranks (e.g. the loss sum before normalising)."""


@dataclass
class Work:
    """What a step processed, all ranks together: the denominators of tokens/s and MFU."""

    tokens: float
    flops: float


@dataclass
class StepResult:
    figures: dict[str, float]
    """The step's numbers for metrics.jsonl, ``loss`` first."""
    work: Work


class Objective(abc.ABC):
    """A training loss as the driver sees it: given a micro-batch, its loss sum and counts."""

    @abc.abstractmethod
    def counts(self, batch: dict) -> dict[str, float]:
        """This rank's normalisers of ``batch`` (e.g. label tokens); the driver sums them over ranks."""

    @abc.abstractmethod
    def __call__(self, forward, micro: dict, counts: dict[str, float]) -> Part:
        """The loss of one micro-batch (rows of the batch, on the device); ``forward`` is the
        model under the step's autocast; ``counts`` are the global ones."""

    @abc.abstractmethod
    def figures(self, sums: dict[str, float], counts: dict[str, float], batch: dict) -> dict[str, float]:
        """The step's figures from the global sums and counts."""

    @abc.abstractmethod
    def work(self, batch: dict, counts: dict[str, float]) -> Work:
        """Tokens and FLOPs of the step, all ranks together."""

    def headline(self, figures: dict[str, float]) -> str:
        """The step's figures as the terminal line shows them first."""
        return f"loss {figures['loss']:.4f}"


class Forward:
    """The model called under autocast (nothing when ``dtype`` is None: float32)."""

    def __init__(self, model, device: Device, dtype: torch.dtype | None):
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, *args, **kwargs):
        with autocast(self.device, self.dtype):
            return self.model(*args, **kwargs)


def rows(batch: dict, sl: slice, device=None) -> dict:
    """Rows ``sl`` of every tensor of ``batch`` (moved to ``device`` when given); other
    entries (e.g. a rollout's figures) unchanged."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value[sl] if device is None else value[sl].to(device)
        out[key] = value
    return out


def forward_backward(
    model,
    batch: dict,
    objective: Objective,
    micro: int,
    amp: torch.dtype | None,
    device: Device,
    world: World,
    across=None,
) -> StepResult:
    """Accumulate in ``.grad`` the gradients of ``objective`` over ``batch`` (this rank's
    rows of the global batch), ``micro`` rows per forward pass (0: all at once). ``across``:
    sums named numbers over the pools of a run (anychip.pools), whose gradients then add up."""
    across = across or (lambda values: values)
    counts = across(all_reduce_sums(objective.counts(batch), world))
    dev = unwrap(model).embed_tokens.weight.device
    forward = Forward(model, device, amp)
    n = batch["input_ids"].shape[0]
    micro = micro or n
    starts = range(0, n, micro)
    sums: dict[str, float] = {}
    for i, start in enumerate(starts):
        # gradients are synchronised over ranks on the last micro-batch only
        with no_sync(model, last=i == len(starts) - 1):
            part = objective(forward, rows(batch, slice(start, start + micro), dev), counts)
            (part.loss * world.world_size).backward()
        for key, value in part.sums.items():
            sums[key] = sums.get(key, 0.0) + value
    sums = across(all_reduce_sums(sums, world))
    return StepResult(objective.figures(sums, counts, batch), objective.work(batch, counts))


def no_sync(model, last: bool):
    """Gradient-sync control of one micro-batch: DDP's ``no_sync`` or FSDP2's
    ``set_requires_gradient_sync(False)`` on all but the ``last`` micro-batch."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _ResyncFSDP(model)
    return contextlib.nullcontext()


class _ResyncFSDP(contextlib.AbstractContextManager):
    def __init__(self, model):
        self.model = model

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)


def autocast(device: Device, dtype: torch.dtype | None):
    """torch.autocast on ``device`` at ``dtype``; nothing when ``dtype`` is None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_dtype(dtype: str, device: Device) -> torch.dtype | None:
    """The autocast dtype of ``train.dtype``: None is plain float32; ``auto`` picks the
    device's low-precision dtype on accelerators and float32 on CPU. Raises ValueError for a
    dtype the device does not support."""
    if dtype == "float32":
        return None
    if dtype == "auto":
        return None if device.type == "cpu" else device.autocast_dtype()
    chosen = getattr(torch, dtype)
    if not device.supports_dtype(chosen):
        raise ValueError(f"train.dtype = {dtype!r} is not supported on {device.type} ({device.name()})")
    return chosen


def clip_grad_norm(model, max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (0: measure only); returns the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    # expert parallelism: the experts' gradients live on another mesh than the rest's
    meshes: dict[object, list[torch.Tensor]] = {}
    for p in params:
        meshes.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    norms = []
    for group in meshes.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = norms[0] if len(norms) == 1 else torch.stack(norms).norm() if norms else torch.tensor(0.0)
    for group in meshes.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm if max_norm > 0 else float("inf"), total)
    return float(total)
