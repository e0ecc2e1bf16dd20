"""Silent data corruption: wrong numbers without an error.

ReplicaCheck: every ``replica_check_interval`` steps, and before every checkpoint, each
data-parallel replica (DDP) fingerprints its parameters (the integer sum of their bit
patterns: any flipped bit changes it); the fingerprints are all-gathered and a replica
that differs from the majority is named and the run rolls back. A checkpoint is
therefore only written from weights that all replicas agree on.

RecomputeAudit: every ``audit_interval`` steps one slice of the step's batch
(``audit_rows`` sequences) is computed twice on each rank, locally, and the loss and
gradient fingerprints compared: bit-equal on deterministic devices (CPU), within
``audit_tolerance`` elsewhere. A mismatch rolls back; a rank that fails
``audit_max_failures`` audits is reported as faulty hardware and the run stops.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from ..checkpoint import checkpoint_due
from ..parallel import unwrap
from .base import Action, RollbackBudget, Verdict


@torch.no_grad()
def fingerprint(tensors) -> int:
    """An integer that changes when any bit of any tensor changes (local shards)."""
    total = 0
    for i, t in enumerate(tensors, start=1):
        local = t.to_local() if hasattr(t, "to_local") else t
        local = local.detach().contiguous().view(-1)
        if local.numel() == 0:
            continue
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[local.element_size()]
        total = (total + i * int(local.view(bits).sum(dtype=torch.int64))) % (1 << 62)
    return total


def odd_ones_out(prints: list[int]) -> tuple[list[int], bool]:
    """The ranks whose fingerprint differs from the majority's, and whether there is a
    majority (with none, e.g. two replicas that disagree, every rank is a suspect)."""
    value, votes = Counter(prints).most_common(1)[0]
    if votes > len(prints) / 2:
        return [r for r, f in enumerate(prints) if f != value], True
    return list(range(len(prints))), False


class ReplicaCheck:
    def __init__(self, cfg):
        self.interval = cfg.replica_check_interval
        self.budget = RollbackBudget(cfg.max_rollbacks)

    def before_update(self, state) -> None:
        step = state.step
        if step % self.interval and not checkpoint_due(state.cfg, step):
            return
        mine = torch.tensor([fingerprint(state.model.parameters())], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(state.world.world_size)]
        dist.all_gather(everyone, mine)
        prints = [int(t.item()) for t in everyone]
        if len(set(prints)) == 1:
            return
        suspects, majority = odd_ones_out(prints)
        action = self.budget.spend(step)
        who = f"rank(s) {suspects}" if majority else f"no majority among {len(prints)} replicas"
        state.verdicts.append(Verdict(action, "replica_check", f"parameters differ between replicas: {who}",
                                      event="replica_mismatch", detail={"ranks": suspects, "majority": majority,
                                      "fingerprints": [str(f) for f in prints]}))  # fmt: skip

    def after_step(self, state) -> None:
        self.budget.progress(state.step)


class RecomputeAudit:
    def __init__(self, cfg, device):
        self.interval = cfg.audit_interval
        self.rows = cfg.audit_rows
        self.tolerance = cfg.audit_tolerance if cfg.audit_tolerance >= 0 else (0.0 if device.type == "cpu" else 1e-4)
        self.max_failures = cfg.audit_max_failures
        self.failures = 0

    def _once(self, state, x, y) -> torch.Tensor:
        model = state.model
        core = unwrap(model)
        sharded = hasattr(model, "set_requires_gradient_sync")  # FSDP2: gradients would be reduce-scattered
        from ..train.loop import autocast, autocast_dtype

        def objective(out):
            total = out.lm_loss + sum(out.mtp_losses)
            return total if out.balance_loss is None else total + out.balance_loss

        with autocast(state.device, autocast_dtype(state.cfg, state.device)):
            if sharded:
                with torch.no_grad():
                    loss = objective(model(x, labels=y, reduction="sum")).detach()
                model.reshard()  # FSDP2 keeps the root gathered after a forward: the update needs the shards
                return loss.float().view(1).cpu().double()
            loss = objective(core(x, labels=y, reduction="sum"))
        params = [p for p in core.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        # per gradient: sum (exact comparisons), sum of |g| and of g^2 (no cancellation: relative
        # comparisons stay meaningful); float32 on the device (not every device has float64)
        parts = [loss.detach().float().view(1)]
        for g in grads:
            if g is not None:
                g = g.float()
                parts.append(torch.stack([g.sum(), g.abs().sum(), g.square().sum()]))
        return torch.cat(parts).cpu().double()

    def before_update(self, state) -> None:
        if state.step % self.interval:
            return
        core = unwrap(state.model)
        dev = core.embed_tokens.weight.device
        x = state.batch["input_ids"][: self.rows].to(dev)
        y = state.batch["labels"][: self.rows].to(dev)
        counters = [m.expert_load.clone() for m in core.moe_layers()]
        first, second = self._once(state, x, y), self._once(state, x, y)
        for m, c in zip(core.moe_layers(), counters):  # the audit's tokens are not the step's
            m.expert_load.copy_(c)
        # the loss and the non-negative parts (|g| and g^2 sums) are compared relatively
        keep = torch.ones_like(first, dtype=torch.bool)
        keep[1::3] = False  # signed sums: only for bit-equality
        diff = float(((first - second).abs() / first.abs().clamp(min=1e-30))[keep].max())
        same = torch.equal(first, second) if self.tolerance == 0 else diff <= self.tolerance
        if same:
            return
        self.failures += 1
        rank = state.world.rank
        if self.failures >= self.max_failures:
            state.verdicts.append(Verdict(Action.STOP, "audit", f"rank {rank} failed {self.failures} recompute "
                                          "audits: faulty hardware, replace it", event="faulty_hardware",
                                          detail={"rank": rank, "failures": self.failures}))  # fmt: skip
            return
        state.verdicts.append(Verdict(Action.ROLLBACK, "audit", f"recompute audit on rank {rank} disagrees "
                                      f"with itself (max relative difference {diff:.3g})", event="audit_mismatch",
                                      detail={"rank": rank, "max_rel_diff": diff}))  # fmt: skip
