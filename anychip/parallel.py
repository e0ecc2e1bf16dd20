"""Processes and data parallelism on torch.distributed: process group, DeviceMesh,
FSDP2 (``fully_shard``) or DDP, applied from outside the model in a fixed order."""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .device import Device
from .errors import ConfigError
from .launcher_env import ATTEMPT

JOB_PREFIX = "anychip/job"  # keys of the whole job, across its restarts (a PrefixStore adds the "/")


def joined_key(attempt: int | str, rank: int) -> str:
    """The store key in which a worker records the newest generation whose process group it joined."""
    return f"anychip/attempt_{attempt}/rank{rank}/joined"


@dataclass(frozen=True)
class Layout:
    """How the ranks are arranged: ``dp_replicate`` x ``dp_shard`` = world size (HSDP:
    FSDP2 shards within each group of ``dp_shard`` ranks, the groups hold replicas), and
    the routed experts sharded over ``ep`` ranks borrowed from the shard dimension (each
    expert then sharded by FSDP over the ``dp_shard / ep`` ranks that hold the same experts)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    def __str__(self) -> str:
        parts = [f"dp_replicate {self.dp_replicate}", f"dp_shard {self.dp_shard}"]
        return " x ".join(parts) + (f", ep {self.ep}" if self.ep > 1 else "")


def plan_layout(world_size: int, parallel, n_routed_experts: int | None = None) -> Layout:
    """The layout ``parallel`` (the ``[parallel]`` section) asks for on ``world_size``
    ranks; ConfigError naming the numbers when they do not fit together (the experts
    checked when their number is given)."""
    r, ep = parallel.dp_replicate, parallel.ep
    if (r > 1 or ep > 1) and world_size == 1:
        raise ConfigError(
            f"parallel.dp_replicate = {r}, parallel.ep = {ep} need several processes; the world size is 1 "
            "(anychip train --nproc N, or torchrun)"
        )
    if (r > 1 or ep > 1) and parallel.strategy != "fsdp":
        raise ConfigError(
            f"parallel.dp_replicate = {r}, parallel.ep = {ep} need parallel.strategy = 'fsdp' "
            f"(got {parallel.strategy!r}): HSDP and expert parallelism are built on FSDP2"
        )
    if world_size % r:
        raise ConfigError(f"parallel.dp_replicate = {r} does not divide the world size {world_size}")
    shard = parallel.dp_shard or world_size // r
    if r * shard != world_size:
        raise ConfigError(
            f"parallel.dp_replicate x parallel.dp_shard = {r} x {shard} = {r * shard} ranks, "
            f"but the world size is {world_size}"
        )
    if shard % ep:
        raise ConfigError(
            f"parallel.ep = {ep} must divide parallel.dp_shard = {shard} "
            f"(expert parallelism borrows ranks from the shard dimension)"
        )
    if n_routed_experts is not None and n_routed_experts % ep:
        raise ConfigError(f"parallel.ep = {ep} must divide the model's {n_routed_experts} routed experts")
    return Layout(r, shard, ep)


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mesh: object | None = None  # DeviceMesh the dense parameters are data-parallel over (1-D, or 2-D for HSDP)
    layout: Layout = Layout()
    ep_mesh: object | None = None  # 1-D: the ranks that share one token exchange (ep > 1)
    expert_mesh: object | None = None  # the ranks holding the same experts (FSDP of the experts; ep > 1)
    store: object | None = None  # the job's store (the launcher's), under this start's prefix
    job_store: object | None = None  # the same store under a prefix of the whole job: outlives restarts

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(device: Device, timeout_s: float = 600.0, parallel=None, generation: int = 0) -> World:
    """Join the process group torchrun / the elastic agent describes in the environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and build the DeviceMesh of the
    layout ``parallel`` asks for (``plan_layout``); a single process needs none.
    ``generation``: how many times this process has restarted training in place (each
    start gets a process group of its own)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    layout = plan_layout(world_size, parallel) if parallel is not None else Layout(1, world_size)
    device.set_current(local_rank)
    if world_size == 1:
        return World()
    store = job_store = None
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # the launcher's store outlives a restart of the workers: keys of the previous attempt
        # or generation (e.g. a dead rank's address) must not be read by the next one
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        attempt = os.environ.get(ATTEMPT) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        base, store = store, dist.PrefixStore(f"anychip/attempt_{attempt}/generation_{generation}/", store)
        dist.init_process_group(device.dist_backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        base.set(joined_key(attempt, rank), str(generation))  # anychip's agent: this rank may be restarted alone
        job_store = dist.PrefixStore(JOB_PREFIX, base)
    from torch.distributed.device_mesh import init_device_mesh

    r, ep = layout.dp_replicate, layout.ep
    if r > 1:
        mesh = init_device_mesh(device.type, (r, layout.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    else:
        mesh = init_device_mesh(device.type, (layout.dp_shard,), mesh_dim_names=("dp_shard",))
    ep_mesh = expert_mesh = None
    if ep > 1:
        # the same ranks as [dp_replicate][dp_shard / ep][ep]: an EP group is ep consecutive ranks
        names = ("dp_replicate", "dp_shard_mod_ep", "ep")
        experts = init_device_mesh(device.type, (r, layout.dp_shard // ep, ep), mesh_dim_names=names)
        ep_mesh = experts["ep"]
        expert_mesh = experts["dp_replicate", "dp_shard_mod_ep"] if r > 1 else experts["dp_shard_mod_ep"]
    return World(rank, world_size, local_rank, mesh, layout, ep_mesh, expert_mesh, store, job_store)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def first_failure(world: World) -> bool:
    """Count a failure of this start in the job's store; True for the first rank to fail
    (the fault's origin: the others fail because of it). True without a store."""
    if world.store is None:
        return True
    try:
        return world.store.add("failed", 1) == 1
    except Exception:  # the store is gone (the launcher died): nobody is counting
        return True


def abort_world(world: World) -> None:
    """Leave the process group at once so that every peer waiting on this rank fails now
    instead of at its collective timeout, and learns of the fault within a collective.

    Destroying the group is not enough where something still holds it (DDP's reducer keeps
    a gloo group alive after the DDP module is gone), and gloo has no abort: the connections
    to the peers are shut down at the socket level, every TCP connection of this process
    except those of the job's store (MASTER_ADDR:MASTER_PORT, from either end). A peer
    blocked on this rank then gets "connection closed", tears down in turn, and so on
    through the ring. Only the training's own connections exist in a worker; an
    accelerator's collective library (NCCL, HCCL) is torn down by aborting the group
    (untested here: no accelerator)."""
    if not world.distributed:
        return
    import gc
    import socket

    if dist.is_initialized():
        # torch's abort (private) does not wait for work in flight, which a collective library
        # with an abort (NCCL) then cancels; destroy where it is missing
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None) or dist.destroy_process_group
        with contextlib.suppress(Exception):
            abort()
    gc.collect()
    store_port = int(os.environ.get("MASTER_PORT", "0"))
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return  # not Linux: the peers find out when this process exits
    for fd in fds:
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue  # not a socket
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                with contextlib.suppress(OSError):
                    # the store's connections stay, from either end (rank 0 may host it: static rendezvous)
                    if store_port not in (s.getpeername()[1], s.getsockname()[1]):
                        s.shutdown(socket.SHUT_RDWR)
        finally:
            s.detach()


def parallelize(
    model: nn.Module,
    world: World,
    strategy: str,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Wrap ``model`` for data parallelism over ``world``; unchanged on one process.

    fsdp: FSDP2 ``fully_shard`` on every transformer block and MTP module, then the root
    (parameters, gradients and optimizer state sharded over ranks); with
    ``dp_replicate`` > 1 over a 2-D mesh (HSDP). With ``ep`` > 1 the routed experts are
    first sharded over the EP ranks (``expert_parallel.py``) and each MoE layer's experts
    are their own FSDP unit over the ranks that hold the same experts. ``param_dtype``
    (the autocast dtype; None: float32): the dtype parameters are all-gathered in and
    computed with, the sharded master weights staying float32; gradients are
    reduce-scattered in ``reduce_dtype``. A model on the meta device stays there: only the
    shards exist once it is materialised (``to_empty``), never the whole tensors.
    ddp: DistributedDataParallel (replicated parameters, all-reduced gradients).
    """
    if not world.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # inputs are not cast: the residual stream stays float32 between the blocks
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
        fully_shard = functools.partial(fully_shard, mp_policy=mp)
        if world.layout.ep > 1:
            from .models.deepseek.expert_parallel import apply_expert_parallel

            apply_expert_parallel(model, world.ep_mesh)
            for moe in model.moe_layers():
                fully_shard(moe.experts, mesh=world.expert_mesh)
                # an expert's gradient already sums the tokens of its EP group; FSDP sums over
                # the rest: divide by the world size as for every other parameter
                moe.experts.set_gradient_divide_factor(float(world.world_size))
                if world.layout.dp_shard > world.layout.ep:
                    # sum, then divide: a divide factor other than the group size would otherwise
                    # ask for a pre-multiplied sum, which gloo does not have. Not with a group of
                    # one, where torch 2.13 would then divide twice (measured)
                    moe.experts.set_force_sum_reduction_for_comms(True)
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


@torch.no_grad()
def copy_shards(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into ``dst``, laid out alike, shard by
    shard (no gathering). Raises ValueError when their names differ."""
    for (a, p), (b, q) in zip(
        [*src.named_parameters(), *src.named_buffers()], [*dst.named_parameters(), *dst.named_buffers()], strict=True
    ):
        if a != b:
            raise ValueError(f"copy_shards: {a!r} and {b!r} are not the same tensor of two alike models")
        local = q.to_local() if hasattr(q, "to_local") else q
        local.copy_(p.to_local() if hasattr(p, "to_local") else p)


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
