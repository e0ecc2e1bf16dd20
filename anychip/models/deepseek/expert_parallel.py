"""Expert parallelism: the routed experts of every MoE layer sharded over the ``ep`` ranks
of a DeviceMesh dimension, tokens sent to the ranks that hold their experts and back.

Each of the ``ep`` ranks holds N_r / ep consecutive experts (a DTensor, ``Shard(0)`` of
the stacked weights, so checkpoints hold the global tensors and load under any layout).
Per MoE layer and micro-batch, on every rank:

    1. the router runs on the rank's own tokens (global expert ids, global loads for
       the balancing bias: nothing changes there);
    2. the rows sorted by expert are sent to their experts' ranks with
       ``all_to_all_single`` (variable splits; the per-expert counts go first, one
       small all-to-all), arriving grouped by source rank;
    3. they are regrouped by local expert, go through the grouped GEMM on the local
       weights, are put back in arrival order and returned with the reverse all-to-all;
    4. the gate weighting and the sum over the K_r experts of each token are local.

The backward pass of an all-to-all is the all-to-all with the splits swapped, so the
gradient of an expert sums over the tokens of every rank of its EP group; FSDP then
reduces over the ranks holding the same experts (``anychip.parallel``).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from ...errors import ConfigError
from .model import DeepSeekV3, RoutedExperts, swiglu_experts


def apply_expert_parallel(model: DeepSeekV3, ep_mesh) -> None:
    """Shard the routed experts of every MoE layer of ``model`` (the MTP modules' too)
    over the 1-D ``ep_mesh`` and route their tokens through all-to-all, in place."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep = ep_mesh.size()
    for moe in model.moe_layers():
        experts = moe.experts
        n = experts.gate_up_proj.shape[0]
        if n % ep:
            raise ConfigError(f"parallel.ep = {ep} must divide the model's {n} routed experts")
        for name, p in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(p.detach(), ep_mesh, [Shard(0)])
            experts.register_parameter(name, nn.Parameter(sharded, requires_grad=p.requires_grad))
        experts.ffn = functools.partial(_dispatched_ffn, experts, ep_mesh.get_group())


@torch.compiler.disable  # data-dependent splits and collectives: eager between the compiled parts
def _dispatched_ffn(experts: RoutedExperts, group, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``RoutedExperts.ffn`` across the EP group: x [T*K_r, d] sorted by (global) expert,
    counts [N_r] -> the rows through their experts, in x's order."""
    gate_up, down = experts.gate_up_proj.to_local(), experts.down_proj.to_local()
    n_local = gate_up.shape[0]
    ep = counts.numel() // n_local
    # how many rows each rank sends to each of this rank's experts: [ep (source), n_local]
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    received = received.view(ep, n_local)
    send = counts.view(ep, n_local).sum(dim=1).tolist()
    recv = received.sum(dim=1).tolist()
    y = _AllToAll.apply(x, recv, send, group)  # grouped by source rank, then by expert
    by_expert = _regroup(received)  # arrival order -> (expert, source rank) order
    out = swiglu_experts(y[by_expert], gate_up, down, received.sum(dim=0))
    out = torch.empty_like(out).index_copy(0, by_expert, out)  # back to arrival order
    return _AllToAll.apply(out, send, recv, group)


def _regroup(received: torch.Tensor) -> torch.Tensor:
    """Row indices that reorder rows arriving as [source][expert] blocks (sizes
    ``received`` [ep, n_local]) into [expert][source] blocks."""
    ep, n_local = received.shape
    block = torch.arange(n_local, device=received.device) * ep + torch.arange(ep, device=received.device)[:, None]
    return block.flatten().repeat_interleave(received.flatten()).argsort(stable=True)


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with variable splits; its gradient goes back the same
    way with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None
