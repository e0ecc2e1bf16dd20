"""Processes and data parallelism on torch.distributed: process group, DeviceMesh,
FSDP2 (``fully_shard``) or DDP, applied from outside the model in a fixed order."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .device import Device


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: object | None = None  # DeviceMesh over the data-parallel ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: Device, timeout_s: float = 600.0) -> World:
    """Join the process group torchrun / the elastic agent describes in the environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a single process needs none."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device.set_current(local_rank)
    if world_size == 1:
        return World()
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # the launcher's store outlives a restart of the workers: keys of the previous attempt
        # (e.g. a dead rank's address) must not be read by the next one
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"anychip/attempt_{attempt}/", store)
        dist.init_process_group(device.dist_backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))
    return World(rank, world_size, local_rank, mesh)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, world: World, strategy: str) -> nn.Module:
    """Wrap ``model`` for data parallelism over ``world``; unchanged on one process.

    fsdp: FSDP2 ``fully_shard`` on every transformer block and MTP module, then the root
    (parameters, gradients and optimizer state sharded over ranks).
    ddp: DistributedDataParallel (replicated parameters, all-reduced gradients).
    """
    if not world.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block, mesh=world.mesh)
        for module in model.mtp:
            fully_shard(module, mesh=world.mesh)
        fully_shard(model, mesh=world.mesh)
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = None if model.embed_tokens.weight.device.type == "cpu" else [world.local_rank]
        unused = bool(model.mtp) and not model.args.mtp_loss_weight  # MTP modules that get no gradient
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)
    raise ValueError(f"parallel.strategy = {strategy!r}; expected 'fsdp' or 'ddp'")


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, under a DDP wrapper if any (FSDP2 wraps in place)."""
    return getattr(model, "module", model)


def full_state_dict(model: nn.Module, world: World) -> dict:
    """The model's full (unsharded) state dict on every rank, without a DDP "module." prefix."""
    if not world.distributed:
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k.removeprefix("module."): v for k, v in full.items()}


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_sums(values: dict[str, float], world: World) -> dict[str, float]:
    """Each named number summed over ranks (one all-reduce, in float64); every rank must
    pass the same names in the same order."""
    summed = all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64), world)
    return dict(zip(values, summed.tolist()))


def all_gather_floats(value: float, world: World) -> list[float]:
    """Every rank's ``value`` (e.g. step time), gathered on every rank."""
    if not world.distributed:
        return [value]
    out = [None] * world.world_size
    dist.all_gather_object(out, value)
    return out
