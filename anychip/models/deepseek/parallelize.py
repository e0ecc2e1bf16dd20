"""How DeepSeekV3 is laid out for training, applied outside the model in a fixed order
(torchtitan's): activation checkpointing, then compile, then data parallelism
(``anychip.parallel``).

Compile (``train.compile``): each transformer block is compiled in place
(``nn.Module.compile``: names unchanged) with torch.compile's default backend (inductor
on CPU and CUDA; any device torch.compile supports). The routed experts' grouped GEMM is
one opaque operator to the compiler (``anychip::grouped_linear``). Compile together with
activation checkpointing is refused for now: the compiled recomputation counts the MoE
tokens a second time (measured), which would bias the balancing update.

Activation checkpointing (``train.activation_checkpoint``):

    none       every activation is kept for the backward pass
    block      each transformer block (and each MTP module's block) keeps only its input;
               its forward runs again inside the backward pass
    selective  as block, but the outputs of the matrix multiplications (dense, grouped,
               attention) are kept: only the cheap ops (norms, activations, softmax,
               routing) run again. Less memory saved than ``block``, less compute spent.

The recomputed forward does not count its tokens a second time into the MoE layers'
``expert_load`` (the balancing bias sees each token once), and on CPU it gives
bit-identical losses and gradients.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .model import Block, DeepSeekV3, MoE, grouped_mm_works

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
    context = functools.partial(_contexts, block, mode)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)


def _contexts(block: Block, mode: str):
    """(context of the first forward, context of the recomputation)."""
    moe = block.mlp if isinstance(block.mlp, MoE) else None
    if mode == "selective":
        first, again = create_selective_checkpoint_contexts(_policy)
    else:
        first, again = contextlib.nullcontext(), contextlib.nullcontext()
    return first, _Recomputing(again, moe)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _Recomputing:
    """The recomputation's context: ``inner`` (selective checkpointing's cache, or nothing),
    and the MoE layer does not count its tokens again. Re-entrant: the recomputation may
    run more than once."""

    def __init__(self, inner, moe: MoE | None):
        self.inner, self.moe = inner, moe

    def __enter__(self):
        if self.moe is not None:
            self.moe.count_loads = False
        return self.inner.__enter__()

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            if self.moe is not None:
                self.moe.count_loads = True
