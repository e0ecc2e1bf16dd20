"""Memory per device and time per step of one layout, and the search over layouts.

A layout is what anychip can run (``anychip.parallel``): R replicas x S shards (HSDP; FSDP2
when R = 1), expert parallelism E within the shard dimension, activation checkpointing, and a
micro-batch of M sequences. Per device:

    params, grads, optimizer   float32 parameters, their gradients and AdamW's two moments,
                 sharded over S (the experts over E x S/E = S ranks too)
    buffers      FSDP's gathered blocks (this one and the prefetched next), gathered in the
                 compute dtype; the root's embedding and output head while gathered; with more than one micro-batch, the unsharded gradients of every
                 parameter this rank computes with (FSDP reduce-scatters after the last only)
    activations  what one micro-batch keeps for the backward pass (``activations.py``), scaled
                 from float32 to the compute dtype

Time: the FLOPs the step executes (``flops.py``; a third more under block checkpointing, for
the blocks' second forward) at an assumed MFU of the chip's peak, plus the bytes each collective sends
over the link it crosses, at an assumed efficiency of the link; no overlap of the two.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from ..models.deepseek.args import ModelArgs
from ..models.deepseek.model import DeepSeekV3
from .activations import saved_bytes
from .chips import Chip
from .flops import step_flops_per_sequence

MODES = ("none", "block", "selective")


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.35  # of the chip's dense peak, for the step's FLOPs
    link_efficiency: float = 0.7  # of the listed bandwidth a collective reaches
    headroom: float = 0.10  # of the device memory left free (allocator fragmentation, workspace)
    compute_bytes: int = 2  # bytes per activation element (2: bf16 autocast; 4: float32)
    max_micro_batch: int = 8
    expert_imbalance: float = 1.0  # the busiest EP rank's all-to-all rows over the mean (1: balanced routing)


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    ep: int
    activation_checkpoint: str
    micro_batch: int

    def __str__(self) -> str:
        data = f"{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"fsdp {self.dp_shard}"
        ep = f", ep {self.ep}" if self.ep > 1 else ""
        return f"{data}{ep}, ckpt {self.activation_checkpoint}, micro {self.micro_batch}"


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    params: float  # bytes per device: float32 parameters, sharded
    grads: float  # their float32 gradients, sharded
    optimizer: float  # AdamW's two float32 moments, sharded
    buffers: float
    activations: float
    total: float
    capacity: float  # device memory less the headroom
    compute_s: float
    comm_s: float
    step_s: float
    comm_bytes: dict[str, float]  # bytes one device sends per step, per collective
    tokens_per_s: float

    @property
    def state(self) -> float:
        """Parameters, gradients and optimizer state: what stays between steps."""
        return self.params + self.grads + self.optimizer

    @property
    def headroom(self) -> float:
        """Bytes left below the capacity (negative: does not fit)."""
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def to_dict(self) -> dict:
        extra = {"state": self.state, "headroom": self.headroom, "fits": self.fits}
        return {**asdict(self), "layout": asdict(self.layout), **extra}


@dataclass(frozen=True)
class Shapes:
    """Parameter counts the estimate needs, from the model built on the meta device."""

    total: int
    experts: int  # routed experts, all layers
    root: int  # outside the blocks: embedding, output head, final norm
    block_dense: int  # the largest block's non-expert parameters
    block_experts: int  # the largest MoE block's routed-expert parameters
    moe_layers: int


@functools.lru_cache(maxsize=16)
def shapes(args: ModelArgs) -> Shapes:
    with torch.device("meta"):
        model = DeepSeekV3(args)
    blocks = [*model.layers, *(m.block for m in model.mtp)]
    experts = sum(p.numel() for m in model.moe_layers() for p in m.experts.parameters())
    in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    dense = [sum(p.numel() for n, p in b.named_parameters() if ".experts." not in f".{n}") for b in blocks]
    routed = [sum(p.numel() for p in m.experts.parameters()) for m in model.moe_layers()] or [0]
    return Shapes(total, experts, total - in_blocks, max(dense), max(routed), len(model.moe_layers()))


def estimate(
    args: ModelArgs, chip: Chip, count: int, seq_len: int, global_batch: int, layout: Layout, a: Assumptions
) -> Estimate:
    s = shapes(args)
    R, S, E, M = layout.dp_replicate, layout.dp_shard, layout.ep, layout.micro_batch
    local = global_batch // count  # sequences per device per step
    micro_steps = local // M
    f32 = 4
    params = grads = f32 * s.total / S
    optimizer = 2 * f32 * s.total / S
    # FSDP2 gathers the parameters in the compute dtype (its MixedPrecisionPolicy) and reduce-scatters in float32
    gathered_block = (s.block_dense + s.block_experts / E) * a.compute_bytes
    tokens_mb = M * seq_len
    a2a_rows = tokens_mb * args.num_experts_per_tok * args.hidden_size * a.compute_bytes if E > 1 else 0
    # two gathered blocks (this one and the prefetched next); their unsharded gradients, the
    # third candidate, were not part of the peak measured on the CPU (2 and 4 processes)
    # (the all-to-all's send and receive rows live within one MoE layer's pass, not at the step's peak)
    buffers = 2 * gathered_block + s.root * a.compute_bytes
    if micro_steps > 1:  # the micro-batches before the last accumulate unsharded gradients (no reduce-scatter)
        buffers += (s.total - s.experts + s.experts / E) * a.compute_bytes
    saved = saved_bytes(args, M, seq_len)
    activations = saved.activations(layout.activation_checkpoint) * a.compute_bytes / 4
    grads_unsharded = 0.0  # gradients are reduce-scattered block by block: counted in buffers
    total = params + grads + optimizer + buffers + activations + grads_unsharded
    capacity = chip.memory * (1 - a.headroom)

    flops = step_flops_per_sequence(args, seq_len) * global_batch / count
    if layout.activation_checkpoint == "block":
        flops *= 4 / 3  # one more forward of the blocks
    compute_s = flops / (chip.peak() * a.mfu)

    dense = s.total - s.experts
    comm = {}
    shard_frac = (S - 1) / S
    # every block is gathered for its forward and again for its backward, per micro-batch; the root
    # (embedding, output head) stays gathered from its forward through its backward
    comm["all_gather"] = micro_steps * (2 * dense - s.root) * a.compute_bytes * shard_frac
    comm["reduce_scatter"] = dense * f32 * shard_frac
    expert_group = S // E
    if expert_group > 1:
        frac = (expert_group - 1) / expert_group
        comm["all_gather"] += 2 * micro_steps * s.experts / E * a.compute_bytes * frac
        comm["reduce_scatter"] += s.experts / E * f32 * frac
    if R > 1:
        comm["all_reduce"] = 2 * (R - 1) / R * s.total / S * f32
    if E > 1:
        passes = 4 + (2 if layout.activation_checkpoint != "none" else 0)  # the recomputation exchanges again
        comm["all_to_all"] = passes * micro_steps * s.moe_layers * a2a_rows * (E - 1) / E * a.expert_imbalance
    link = {
        "all_gather": chip.intra if chip.per_node >= S else chip.inter,
        "reduce_scatter": chip.intra if chip.per_node >= S else chip.inter,
        "all_reduce": chip.intra if count <= chip.per_node else chip.inter,
        "all_to_all": chip.intra if chip.per_node >= E else chip.inter,
    }
    comm_s = sum(b / (link[k] * a.link_efficiency) for k, b in comm.items())
    step_s = compute_s + comm_s
    return Estimate(
        layout, params, grads, optimizer, buffers, activations, total, capacity, compute_s, comm_s, step_s, comm,
        global_batch * seq_len / step_s,
    )  # fmt: skip


def layouts(args: ModelArgs, count: int, global_batch: int, a: Assumptions) -> list[Layout]:
    """Every layout anychip can run on ``count`` devices for this batch."""
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not a multiple of the {count} devices")
    local = global_batch // count
    micro = [m for m in range(1, min(local, a.max_micro_batch) + 1) if local % m == 0]
    out = []
    for R in _divisors(count):
        S = count // R
        if S == 1 and count > 1:
            continue  # pure replication: anychip's replicas always shard within (use DDP for that)
        for E in _divisors(S):
            if E > 1 and (not args.n_routed_experts or args.n_routed_experts % E):
                continue
            for mode in MODES:
                out += [Layout(R, S, E, mode, m) for m in micro]
    return out


def plan(args: ModelArgs, chip: Chip, count: int, seq_len: int, global_batch: int, a: Assumptions) -> list[Estimate]:
    """Every layout's estimate, fastest first among those that fit, then the rest by memory."""
    est = [estimate(args, chip, count, seq_len, global_batch, lay, a) for lay in layouts(args, count, global_batch, a)]
    fit = sorted((e for e in est if e.fits), key=lambda e: e.step_s)
    rest = sorted((e for e in est if not e.fits), key=lambda e: e.total)
    return fit + rest


def smallest_fleet(args: ModelArgs, chip: Chip, seq_len: int, a: Assumptions, limit: int = 1 << 17) -> int | None:
    """The fewest devices (a multiple of 8, or of a smaller node, or 1, 2, 4) on which some layout
    fits with one sequence per device and per micro-batch; None beyond ``limit``."""
    step = min(chip.per_node, 8)  # a server's worth (a CloudMatrix supernode is 768 dies)
    sizes = [n for n in (1, 2, 4) if n < step] + list(range(step, limit + 1, step))
    lo, hi = 0, len(sizes) - 1
    if not fits_on(args, chip, sizes[hi], seq_len, a):
        return None
    while lo < hi:  # memory per device falls as the fleet grows
        mid = (lo + hi) // 2
        if fits_on(args, chip, sizes[mid], seq_len, a):
            hi = mid
        else:
            lo = mid + 1
    return sizes[lo]


def longest_sequence(args: ModelArgs, chip: Chip, count: int, seq_len: int, a: Assumptions) -> int | None:
    """The longest power-of-two fraction of ``seq_len`` that fits on ``count`` devices (micro-batch 1)."""
    s = seq_len // 2
    while s >= 128:
        if fits_on(args, chip, count, s, a):
            return s
        s //= 2
    return None


def fits_on(args: ModelArgs, chip: Chip, count: int, seq_len: int, a: Assumptions) -> bool:
    """Whether some layout fits with one sequence per device and per micro-batch."""
    one = Assumptions(**{**asdict(a), "max_micro_batch": 1})
    best = min((estimate(args, chip, count, seq_len, count, lay, one) for lay in _memory_lean(args, count)),
               key=lambda e: e.total)  # fmt: skip
    return best.fits


def _memory_lean(args, count) -> list[Layout]:
    """The layouts that need the least memory: all shard, block checkpointing, every EP size."""
    return [Layout(1, count, E, "block", 1) for E in _divisors(count) if E == 1 or (args.n_routed_experts % E == 0)]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def step_growth(args: ModelArgs, micro_batch: int, seq_len: int, mode: str) -> float:
    """Bytes one float32 training step of one process adds to what the model already holds (no
    optimizer step): the activations' peak, plus, under checkpointing, the parameters' float32
    gradients, which are there by the time the blocks are recomputed (without checkpointing the
    peak comes first). What ``tests/test_layout.py`` measures on the CPU, to check the planner."""
    grads = 4 * shapes(args).total if mode != "none" else 0
    return saved_bytes(args, micro_batch, seq_len).activations(mode) + grads
