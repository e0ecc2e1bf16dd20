"""Silent data corruption: wrong numbers without an error.

ReplicaCheck: every ``replica_check_interval`` steps, and before every checkpoint, each
data-parallel replica (DDP) fingerprints its parameters (the integer sum of their bit
patterns: any flipped bit changes it); the fingerprints are all-gathered and a replica
that differs from the majority is named and the run rolls back. A checkpoint is
therefore only written from weights that all replicas agree on.

RecomputeAudit: every ``audit_interval`` steps the step's own objective on one slice of
its batch (``audit_rows`` sequences) is computed twice on each rank, locally, and the loss
and gradient fingerprints compared: bit-equal on deterministic devices (CPU), within
``audit_tolerance`` elsewhere. Both recomputes run with torch's deterministic algorithms
(``Device.prepare_determinism`` readied them at the worker's start): a healthy GPU's
atomics-based kernels (the MoE combine's ``index_add_``) would otherwise differ between the
two by rounding order. A mismatch rolls back; a rank that fails ``audit_max_failures``
audits is reported as faulty hardware and the run stops.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from ..parallel import unwrap
from ..train.step import Forward, Objective, rows
from .base import Action, Guard, RollbackBudget, StepView, Verdict


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


class ReplicaCheck(Guard):
    def __init__(self, cfg, model, world, checkpoint_due: Callable[[int], bool]):
        self.interval = cfg.replica_check_interval
        self.budget = RollbackBudget(cfg.max_rollbacks)
        self.model, self.world, self.checkpoint_due = model, world, checkpoint_due
        self.passed: int | None = None  # the last step whose check found the replicas equal, since the start

    def judge(self, view: StepView) -> Verdict | None:
        step = view.step
        if step % self.interval and not self.checkpoint_due(step):
            return None
        prints = self._fingerprints()
        if len(set(prints)) == 1:
            self.passed = step
            return None
        suspects, majority = odd_ones_out(prints)
        action = self.budget.spend(step)
        who = f"rank(s) {suspects}" if majority else f"no majority among {len(prints)} replicas"
        detail = {"ranks": suspects, "majority": majority, "fingerprints": [str(f) for f in prints]}
        reason = f"parameters differ between replicas: {who}"
        # back to the state after the last step the replicas agreed at (a snapshot or the checkpoint
        # written then); none since the start: to a checkpoint, written only from weights they agreed
        # on (a snapshot restored at the start may hold the corruption)
        if self.passed is not None:
            return Verdict(
                action, "replica_check", reason, before=self.passed + 1, event="replica_mismatch", detail=detail
            )
        return Verdict(action, "replica_check", reason, verified=True, event="replica_mismatch", detail=detail)

    def _fingerprints(self) -> list[int]:
        mine = torch.tensor([fingerprint(self.model.parameters())], dtype=torch.int64)
        everyone = [torch.zeros_like(mine) for _ in range(self.world.world_size)]
        dist.all_gather(everyone, mine)
        return [int(t.item()) for t in everyone]

    def started(self, step: int) -> None:
        """The state the run starts from (a snapshot restored after a restart may hold a flip) is
        compared at once: when the replicas agree, a later mismatch goes back to it, not to
        the disk checkpoint before it."""
        self.passed = step if len(set(self._fingerprints())) == 1 else None

    def rolled_back(self, step: int) -> None:
        self.passed = None if self.passed is None or self.passed > step else self.passed

    def completed(self, view: StepView, metrics: dict, agreement) -> None:
        self.budget.progress(view.step)


@contextlib.contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic algorithms for the duration, the previous setting restored after,
    also on error. An op with no deterministic kernel warns (torch's ``warn_only``) rather than
    stop a healthy run, unless the run asked for deterministic algorithms throughout."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only or not enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class RecomputeAudit(Guard):
    """The step's objective on ``audit_rows`` rows of its batch, twice, through the same
    code path as the step (``anychip.train.step``): the loss and gradient fingerprints must agree."""

    def __init__(self, cfg, model, device, amp, objective: Objective, rank: int):
        self.interval = cfg.audit_interval
        self.rows = cfg.audit_rows
        self.tolerance = cfg.audit_tolerance if cfg.audit_tolerance >= 0 else (0.0 if device.type == "cpu" else 1e-4)
        self.max_failures = cfg.audit_max_failures
        self.failures = 0
        self.model, self.device, self.amp, self.objective, self.rank = model, device, amp, objective, rank

    def _once(self, micro: dict) -> torch.Tensor:
        model = self.model
        core = unwrap(model)
        counts = self.objective.counts(micro)  # this slice's own: the audit compares the rank with itself
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: gradients would be reduce-scattered
            with torch.no_grad():
                loss = self.objective(Forward(model, self.device, self.amp), micro, counts).loss.detach()
            model.reshard()  # FSDP2 keeps the root gathered after a forward: the update needs the shards
            return loss.float().view(1).cpu().double()
        loss = self.objective(Forward(core, self.device, self.amp), micro, counts).loss  # not DDP's forward
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

    def judge(self, view: StepView) -> Verdict | None:
        if view.step % self.interval:
            return None
        core = unwrap(self.model)
        micro = rows(view.batch, slice(0, self.rows), core.embed_tokens.weight.device)
        counters = [m.expert_load.clone() for m in core.moe_layers()]
        with deterministic_algorithms():
            first, second = self._once(micro), self._once(micro)
        for m, c in zip(core.moe_layers(), counters):  # the audit's tokens are not the step's
            m.expert_load.copy_(c)
        # the loss and the non-negative parts (|g| and g^2 sums) are compared relatively
        keep = torch.ones_like(first, dtype=torch.bool)
        keep[1::3] = False  # signed sums: only for bit-equality
        diff = float(((first - second).abs() / first.abs().clamp(min=1e-30))[keep].max())
        same = torch.equal(first, second) if self.tolerance == 0 else diff <= self.tolerance
        if same:  # the run goes on; the metric shows when the audit ran and how close it came
            return Verdict(Action.GO, "audit", "", metrics={"audit_max_rel_diff": diff})
        self.failures += 1
        rank = self.rank
        if self.failures >= self.max_failures:
            reason = f"rank {rank} failed {self.failures} recompute audits: faulty hardware, replace it"
            detail = {"rank": rank, "failures": self.failures}
            return Verdict(Action.STOP, "audit", reason, event="faulty_hardware", detail=detail)
        reason = f"recompute audit on rank {rank} disagrees with itself (max relative difference {diff:.3g})"
        detail = {"rank": rank, "max_rel_diff": diff}
        return Verdict(Action.ROLLBACK, "audit", reason, event="audit_mismatch", detail=detail)
