"""What a training step keeps for its backward pass, counted by running the real model on the
meta device: no formula to drift from the code, any shape (``v3`` included) in milliseconds.

One forward pass of one micro-batch under ``torch.autograd.graph.saved_tensors_hooks`` counts,
per transformer block and outside the blocks, the bytes of every distinct tensor autograd saves
(parameters excluded), and a dispatch mode counts the outputs of the operations selective
checkpointing keeps. The routed experts are assumed balanced (the rows they save do not depend
on the routing: every token goes to K_r experts), and their grouped GEMM is counted as one
matrix product per projection, which saves the same tensors.

From these, the peak activation memory of a micro-batch under each checkpointing mode:

    none       everything saved, outside and inside the blocks (the peak is where the
               backward pass starts; each block's gradients then replace what it saved)
    block      the larger of: outside + each block's input (the end of the forward pass), and
               each block's input + one block's full set while it is recomputed (the outside's
               tensors are freed by then)
    selective  as block, with the kept matmul outputs of every block added to both, and only
               the rest of a block recomputed

Checked against the CPU (``tests/test_layout.py``): tensors larger than 64 KiB allocated with
mmap, so the resident set follows the live tensors.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ..models.deepseek.args import ModelArgs
from ..models.deepseek.model import DeepSeekV3, RoutedExperts
from ..models.deepseek.parallelize import SAVED_OPS


@dataclass(frozen=True)
class Saved:
    """Bytes one micro-batch keeps for the backward pass (float32 activations)."""

    outside: int  # embedding, final norm, output head and cross-entropy (the logits), MTP glue
    blocks: tuple[int, ...]  # per transformer block (MTP modules' blocks last): everything it saves
    kept: tuple[int, ...]  # per block: the outputs of the ops selective checkpointing keeps
    inputs: tuple[int, ...]  # per block: its input, which a checkpoint keeps
    logits: int  # the output head's float32 logits, [tokens, vocab]

    def activations(self, mode: str) -> int:
        """Peak bytes held for the backward pass under checkpointing ``mode``."""
        if mode == "none":
            return self.outside + sum(self.blocks)
        if mode == "block":
            return sum(self.inputs) + max(self.outside, max(self.blocks))
        if mode == "selective":
            rest = max(b - k for b, k in zip(self.blocks, self.kept))
            return sum(self.inputs) + sum(self.kept) + max(self.outside, rest)
        raise ValueError(f"activation checkpointing {mode!r}; expected none, block or selective")


@functools.lru_cache(maxsize=64)
def saved_bytes(args: ModelArgs, micro_batch: int, seq_len: int) -> Saved:
    """Count what one training forward of ``micro_batch`` x ``seq_len`` tokens saves (meta device)."""
    with torch.device("meta"):
        model = DeepSeekV3(args)
    model.train()
    for moe in model.moe_layers():
        moe.experts.ffn = functools.partial(_balanced_ffn, moe.experts)
    blocks = [*model.layers, *(m.block for m in model.mtp)]
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    where = ["outside"]
    saved: dict[str, dict[int, int]] = collections.defaultdict(dict)
    inputs: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in params:
            saved[where[-1]][s._cdata] = s.nbytes()
        return t

    def enter(name, module, args):
        inputs[name] = args[0].numel() * args[0].element_size()
        where.append(name)

    def leave(name, module, args, out):
        where.pop()

    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(functools.partial(enter, i))
        block.register_forward_hook(functools.partial(leave, i))
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    counter = _KeptOutputs(where)
    sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = functools.partial(_fused_attention, counter)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
            model(ids, labels=ids, reduction="sum")
    finally:
        F.scaled_dot_product_attention = sdpa
    outside = sum(saved["outside"].values())
    per_block = tuple(sum(saved[i].values()) for i in range(len(blocks)))
    kept = tuple(counter.bytes[i] for i in range(len(blocks)))
    tokens = micro_batch * seq_len
    logits = tokens * args.vocab_size * 4
    return Saved(outside, per_block, kept, tuple(inputs[i] for i in range(len(blocks))), logits)


def _balanced_ffn(experts: RoutedExperts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The routed experts' SwiGLU for counting on meta: one product per projection (the grouped
    GEMM saves the same rows and weights; the per-expert split needs the counts' values)."""
    h = F.linear(x, experts.gate_up_proj[0])
    gate, up = h.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, experts.down_proj[0])


def _fused_attention(counter, q, k, v, attn_mask=None, is_causal=False, scale=None, **kwargs):
    """What a fused attention kernel (flash, memory-efficient, CPU flash) saves: q, k, v, the
    output and the float32 log-sum-exp per query; on meta, torch would take the math path, which
    saves the [L, L] probabilities no training kernel keeps."""
    out = _FusedAttention.apply(q, k, v)
    counter.add(out)
    return out


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: meta only counts
        raise NotImplementedError


class _KeptOutputs(TorchDispatchMode):
    """Bytes of the outputs of selective checkpointing's kept ops, per block."""

    def __init__(self, where: list):
        super().__init__()
        self.where = where
        self.bytes: dict = collections.defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVED_OPS:
            self.add(out[0] if isinstance(out, tuple) else out)
        return out

    def add(self, t: torch.Tensor) -> None:
        self.bytes[self.where[-1]] += t.numel() * t.element_size()
