"""Random initialisation that does not depend on the layout, drawn shard by shard.

Each parameter's values are a function of (seed, parameter name) alone: the tensor is cut
along its first dimension into blocks — one expert of a stacked expert tensor, else
``BLOCK_ELEMENTS`` worth of rows — and block b is drawn from a generator of its own,
seeded by (seed, name, b). A rank draws only the blocks that overlap its shard of the
tensor (FSDP2 and expert parallelism shard dimension 0), so

    - 1 process and N processes hold the same full tensors (layouts stay comparable), and
    - a rank's memory is its shard plus one block, whatever the model size (one expert's
      slice of a stacked tensor: 117 MB for DeepSeek-V3, never the stack's 30 GB).

The rules (DeepSeekV3.init_weights): norms 1, biases 0, every other matrix Normal(0, std).
"""

from __future__ import annotations

import hashlib

import torch

BLOCK_ELEMENTS = 1 << 20  # a block of a 2-D tensor: its rows up to 4 MB of float32


def shard_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``p``'s local tensor and the index, along dimension 0 of the full tensor, of its first
    row; (p, 0) for a plain tensor. Raises ValueError for a DTensor sharded along another
    dimension (anychip's layouts shard only dimension 0)."""
    if not hasattr(p, "to_local"):
        return p, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p.to_local()
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape[1:]) != tuple(p.shape[1:]) or any(offset[1:]) or tuple(shape) != tuple(local.shape):
        raise ValueError(f"a tensor of shape {tuple(p.shape)} sharded as {p.placements}: only dimension 0 may be")
    return local, int(offset[0])


def block_rows(shape: torch.Size) -> int:
    """Rows of dimension 0 in one block of a tensor of ``shape``: one for stacked (3-D)
    tensors, e.g. one expert; else as many as fit in BLOCK_ELEMENTS."""
    if len(shape) >= 3:
        return 1
    row = 1
    for n in shape[1:]:
        row *= n
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.no_grad()
def fill_normal(p: torch.Tensor, name: str, seed: int, std: float) -> None:
    """Fill this rank's shard of ``p`` with its Normal(0, ``std``) values (see the module)."""
    local, start = shard_rows(p)
    if local.numel() == 0:
        return
    stop = start + local.shape[0]
    rows = block_rows(p.shape)
    for b in range(start // rows, (stop - 1) // rows + 1):
        lo, hi = b * rows, min((b + 1) * rows, p.shape[0])
        gen = torch.Generator(device="cpu").manual_seed(block_seed(seed, name, b))
        values = torch.randn((hi - lo, *p.shape[1:]), generator=gen).mul_(std)
        a, z = max(lo, start), min(hi, stop)
        local[a - start : z - start].copy_(values[a - lo : z - lo])


@torch.no_grad()
def init_parameters(model: torch.nn.Module, seed: int | None, std: float, prefix: str = "") -> None:
    """Norm weights 1, biases 0, every other parameter Normal(0, ``std``), of the parameters
    whose names start with ``prefix``: on this rank's shards only. ``seed`` None: one drawn
    from torch's global generator (so ``torch.manual_seed`` still fixes the values)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    for name, p in model.named_parameters():
        if not name.startswith(prefix):
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        elif name.endswith(".bias"):
            local.zero_()
        else:
            fill_normal(p, name, seed, std)
