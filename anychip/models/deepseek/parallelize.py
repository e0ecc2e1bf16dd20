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

The checkpointed region has no side effect, so a recomputation cannot count its tokens a
second time into the MoE layers' ``expert_load`` (the balancing bias sees each token once),
and the compiler can trace it whole: the block returns its MoE's token counts and balance
loss (``Block.forward_with_stats``), which are kept on the MoE after the region, and the
model adds the counts up after its own forward. Eager, on CPU, checkpointing gives
bit-identical losses and gradients; compiled, they stay within compile's own rounding of
the eager ones.
"""

from __future__ import annotations

import collections
import functools

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    _CachedTorchDispatchMode,
    _CachingTorchDispatchMode,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from .model import Block, DeepSeekV3, MoE, grouped_mm_works

ACTIVATION_CHECKPOINT = ("none", "block", "selective")

# kept by selective checkpointing: what costs FLOPs to recompute
SAVED_OPS = {
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
        block.forward = functools.partial(_checkpointed, block, mode)


def apply_compile(model: DeepSeekV3, enabled: bool, expert_parallel: bool = False) -> None:
    """Compile every transformer block of ``model`` in place (the MTP modules' blocks too).

    With ``expert_parallel`` and activation checkpointing, an MoE block is compiled piece by piece
    instead (attention, norms, router, shared experts; the routed experts' token exchange and
    grouped GEMM stay eager). The exchange cannot be traced, so such a block cannot be compiled
    whole around its checkpoint, and torch recomputes a checkpoint with the frame compiler off:
    a block compiled as one frame inside its checkpoint would run compiled in the forward and
    eager in the recomputation, which saves other tensors. Compiled modules run compiled in both.
    """
    if not enabled:
        return
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        checkpointed = "forward" in vars(block)  # apply_activation_checkpointing replaced it
        if expert_parallel and checkpointed and isinstance(block.mlp, MoE):
            parts = [block.self_attn, block.input_layernorm, block.post_attention_layernorm, block.mlp.gate]
            for part in [*parts, block.mlp.shared_experts]:
                if part is not None:
                    part.compile()
        else:
            block.compile()
    # A compiled module inside an eager checkpoint must run the same graph in its recomputation.
    # Dynamo tries the most recently used graph first, so once the MTP block's shorter sequence
    # has made a dynamic graph, a main block's recomputation would pick that one and save other
    # tensors (torch issue 166926): try the graphs in the order they were compiled.
    torch._C._dynamo.eval_frame._set_lru_cache(False)


def _checkpointed(block: Block, mode: str, *args, **kwargs):
    if not (block.training and torch.is_grad_enabled()):  # evaluation and sampling keep nothing anyway
        return Block.forward(block, *args, **kwargs)
    x = args[0]
    if not torch.compiler.is_compiling():  # compiled, the experts' GEMM is one opaque op that SAC does not see into
        # the grouped GEMM's one-time probe runs before, not inside, the checkpointed region
        grouped_mm_works(x.device, x.dtype)
        if torch.is_autocast_enabled(x.device.type):
            grouped_mm_works(x.device, torch.get_autocast_dtype(x.device.type))
    context = {} if mode == "block" else {"context_fn": _selective_contexts}
    out, stats = checkpoint(block.forward_with_stats, *args, use_reentrant=False, **context, **kwargs)
    if stats is not None:  # kept outside the checkpointed region: the recomputation keeps nothing
        block.mlp.keep_stats(*stats)
    return out


def _selective_contexts():
    """(the first forward's dispatch mode, the recomputation's)."""
    if torch.compiler.is_compiling():  # torch's own: they mark every op of the traced region for the partitioner
        return create_selective_checkpoint_contexts(_policy)
    storage = collections.defaultdict(dict)
    return _Keeping(_policy, storage), _Replaying(None, storage)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


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
        if func not in SAVED_OPS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


class _Replaying(_CachedTorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in SAVED_OPS:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)
