"""How DeepSeekV3 is laid out for training, applied outside the model in a fixed order
(torchtitan's): activation checkpointing, then compile, then data parallelism
(``anychip.parallel``).

Compile (``train.compile``): each transformer block is compiled in place
(``nn.Module.compile``: names unchanged) with torch.compile's default backend (inductor
on CPU and CUDA; any device torch.compile supports). The routed experts' grouped GEMM is
one opaque operator to the compiler (``anychip::grouped_linear``). With activation
checkpointing the compiler traces the checkpointed block and its backward graph recomputes
what the checkpoint did not keep.

Activation checkpointing (``train.activation_checkpoint``):

    none       every activation is kept for the backward pass
    block      each transformer block (and each MTP module's block) keeps only its input;
               its forward runs again inside the backward pass
    selective  as block, but the outputs of the matrix multiplications (dense, grouped,
               attention) are kept: only the cheap ops (norms, activations, softmax,
               routing) run again. Less memory saved than ``block``, less compute spent.

A recomputation cannot count its tokens a second time into the MoE layers' ``expert_load``
(the balancing bias sees each token once): a block only reports its counts
(``MoE.routed``), and the model adds them up after its forward, outside every checkpointed
and compiled region. Eager, on CPU, checkpointing gives bit-identical losses and gradients;
compiled, they stay within compile's own rounding of the eager ones.
"""

from __future__ import annotations

import collections
import functools

import torch
from torch.utils.checkpoint import (
    _CachedTorchDispatchMode,
    _CachingTorchDispatchMode,
    checkpoint,
)

from .model import Block, DeepSeekV3, grouped_mm_works

ACTIVATION_CHECKPOINT = ("none", "block", "selective")

# kept by selective checkpointing: what costs FLOPs to recompute
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._grouped_mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def apply_activation_checkpointing(model: DeepSeekV3, mode: str) -> None:
    """Checkpoint every transformer block of ``model`` in place (``mode`` one of
    ACTIVATION_CHECKPOINT); parameter and state-dict names do not change. Raises
    ValueError for an unknown mode."""
    if mode not in ACTIVATION_CHECKPOINT:
        raise ValueError(f"activation checkpointing {mode!r}; expected one of {', '.join(ACTIVATION_CHECKPOINT)}")
    if mode == "none":
        return
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        block.forward = functools.partial(_checkpointed, block, type(block).forward.__get__(block), mode)


def apply_compile(model: DeepSeekV3, enabled: bool) -> None:
    """Compile every transformer block of ``model`` in place (the MTP modules' blocks too)."""
    if not enabled:
        return
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        block.compile()


def _checkpointed(block: Block, forward, mode: str, *args, **kwargs):
    if not (block.training and torch.is_grad_enabled()):  # evaluation and sampling keep nothing anyway
        return forward(*args, **kwargs)
    x = args[0]
    grouped_mm_works(x.device, x.dtype)  # its one-time probe runs before, not inside, the checkpointed region
    if torch.is_autocast_enabled(x.device.type):
        grouped_mm_works(x.device, torch.get_autocast_dtype(x.device.type))
    if mode == "block":
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)


def _selective_contexts():
    """(the first forward's dispatch mode, the recomputation's)."""
    storage = collections.defaultdict(dict)
    return _Keeping(_policy, storage), _Replaying(None, storage)


def _policy(ctx, op, *args, **kwargs):
    return True  # only the saved ops reach it (``_Keeping``)


# Selective checkpointing's two dispatch modes (torch's, as create_selective_checkpoint_contexts
# makes them) with one change: only the saved ops take a slot in the cache; every other op runs
# as it is, in the first forward and in the recomputation. torch matches the cached outputs to
# the ops of the recomputation by counting each op's calls, and an FSDP unit inside the block
# (the experts' own, under expert parallelism) legitimately runs its runtime a different number
# of times in the recomputation: profiler annotations, all-gathers prefetched before it. Counting
# those raised "invocation index 2 ... not found in storage". The saved ops are the model's
# matrix multiplications, which the recomputation repeats one for one.


class _Keeping(_CachingTorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _SAVED_OPS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _Replaying(_CachedTorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in _SAVED_OPS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)
