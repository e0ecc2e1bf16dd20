"""The bytes a training step's collectives actually send, for checking the planner.

``CommCounter`` is a dispatch mode that sees every c10d collective the step issues (FSDP's
all-gathers and reduce-scatters, the replicas' all-reduce, expert parallelism's all-to-alls)
with its real tensors, and counts what this rank sends as the planner counts it: a ring
all-gather or reduce-scatter over n ranks sends (n-1)/n of the full tensor, an all-reduce
twice that, an all-to-all the rows that go to other ranks.
"""

from __future__ import annotations

import collections

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

c10d = torch.ops.c10d


class CommCounter(TorchDispatchMode):
    def __init__(self, rank_in_ep_group: int = 0):
        super().__init__()
        self.sent: dict[str, float] = collections.defaultdict(float)
        self.ep_rank = rank_in_ep_group

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet in (c10d._allgather_base_, c10d.allgather_into_tensor_coalesced_):
            out, inp = _flat(args[0]), _flat(args[1])
            n = out // max(inp, 1)
            self.sent["all_gather"] += out * (n - 1) / n
        elif packet in (c10d._reduce_scatter_base_, c10d.reduce_scatter_tensor_coalesced_):
            out, inp = _flat(args[0]), _flat(args[1])
            n = inp // max(out, 1)
            self.sent["reduce_scatter"] += inp * (n - 1) / n
        elif packet is c10d.allreduce_:
            group = _size(args[1])
            self.sent["all_reduce"] += 2 * _flat(args[0]) * (group - 1) / group
        elif packet is c10d.alltoall_base_:
            inp, splits = args[1], args[4]
            row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
            if splits:
                self.sent["all_to_all"] += row * (sum(splits) - splits[self.ep_rank])
            else:  # even splits: the counts' exchange
                n = _size(args[2])
                self.sent["all_to_all"] += inp.numel() * inp.element_size() * (n - 1) / n
        return func(*args, **kwargs)


def _size(group) -> int:
    """Ranks of the process group a c10d operator received (as a TorchScript object)."""
    return dist.ProcessGroup.unbox(group).size()


def _flat(t) -> int:
    """Bytes of a tensor or a list of tensors."""
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(_flat(x) for x in t)


def step_worker(
    rank: int, world_size: int, port: int, cases: list, local: int, out: str, model: str = "debug", seq: int = 48
) -> None:
    """One rank of training steps of ``model`` (``local`` sequences of ``seq`` tokens) under each
    case (config settings for the layout, micro-batch size): a first step for FSDP's lazy
    initialisation, then one counted. Rank 0 saves, per case, the bytes per collective (its own,
    and the mean and the largest over the ranks) and the growth of its peak resident set during
    the counted step to ``out``. Start it with
    torch.multiprocessing (gloo, CPU; MALLOC_MMAP_THRESHOLD_=65536 in the environment makes the
    resident set follow the live tensors)."""
    import os

    from ..config import load_config
    from ..device import get_device
    from ..models import DeepSeekV3, preset
    from ..parallel import close_world, init_world, parallelize

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results, world = [], None
    try:
        cpu = get_device("cpu")
        for sets, micro in cases:
            cfg = load_config(None, [f"model.preset={model}", f"parallel.nproc={world_size}", *sets])
            world = init_world(cpu, 120, cfg.parallel)
            net = DeepSeekV3(preset(model))
            net.init_weights(seed=0)
            net = parallelize(net.train(), world, "fsdp")
            x = torch.randint(0, net.args.vocab_size, (local, seq), generator=torch.Generator().manual_seed(rank))
            _step(net, x, micro)  # FSDP's lazy initialisation; the gradients it leaves stay allocated
            counter = CommCounter(rank % world.layout.ep)
            cpu.reset_peak_memory()
            before = cpu.memory_stats()["allocated"]
            with counter:
                _step(net, x, micro)
            growth = cpu.memory_stats()["peak_allocated"] - before
            every = [None] * world_size
            dist.all_gather_object(every, dict(counter.sent))
            kinds = {k for sent in every for k in sent}
            mean = {k: sum(sent.get(k, 0.0) for sent in every) / world_size for k in kinds}
            busiest = {k: max(sent.get(k, 0.0) for sent in every) for k in kinds}
            results.append({"sent": dict(counter.sent), "mean": mean, "max": busiest, "growth": growth})
            del net
        if rank == 0:
            torch.save(results, out)
    finally:
        if world is not None:
            close_world(world)


def _step(model, x: torch.Tensor, micro: int) -> None:
    for i in range(0, len(x), micro):
        model.set_requires_gradient_sync(i + micro >= len(x))
        part = model(x[i : i + micro], labels=x[i : i + micro].roll(-1, 1), reduction="sum")
        (part.lm_loss + sum(part.mtp_losses)).backward()
