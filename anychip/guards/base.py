"""What a guard is, what it says about a step, and how all ranks agree on it.

A guard judges the step in progress before the optimizer changes any weight and
*returns* a Verdict (or None: no objection); ``agree`` takes the strongest verdict over
all ranks and the loop carries it out (``anychip.train.verdicts``). Guards never change
the training state themselves."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

import torch
import torch.distributed as dist


class Action(IntEnum):
    """Ordered: when ranks disagree, the strongest action wins."""

    GO = 0  # apply the update
    RETRY = 1  # drop the gradients and compute the same batch again
    SKIP = 2  # drop the gradients and the batch; go on with the next one
    ROLLBACK = 3  # restore the newest good checkpoint (before ``before``), optionally skipping data
    STOP = 4  # end the run with an error that says why


@dataclass
class Verdict:
    action: Action
    guard: str
    reason: str
    before: int | None = None  # ROLLBACK: the checkpoint must precede this step
    skip_data: bool = False  # ROLLBACK: also skip the batches between the checkpoint and this step
    verified: bool = False  # ROLLBACK: the weights themselves are suspect: only to a checkpoint the replicas agreed on
    event: str = ""  # the event the agreed rank records (e.g. "spike"), with ``detail`` as its fields
    detail: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # figures for this step's metrics (e.g. straggler_ratio)


@dataclass
class StepView:
    """The step in progress as guards see it: after the backward pass and clipping, before the update."""

    step: int
    figures: dict  # the objective's figures (``loss`` first)
    grad_norm: float
    batch: dict


class Guard:
    """One reliability check. ``judge`` is asked about every step; the other methods let it
    follow the run (each optional)."""

    def judge(self, view: StepView) -> Verdict | None:
        """Its verdict on the step in progress; None: no objection."""
        return None

    def started(self, step: int) -> None:
        """The run starts (or resumes) after ``step``."""

    def completed(self, view: StepView, metrics: dict, agreement: Agreement | None) -> None:
        """Step ``view.step`` was applied; ``metrics`` is what was logged of it."""

    def rolled_back(self, step: int) -> None:
        """The run went back to the checkpoint of ``step``."""


class RollbackBudget:
    """``max_rollbacks`` rollbacks for faults the run has not yet got past; the budget is
    refilled once a step beyond the latest fault completes."""

    def __init__(self, max_rollbacks: int):
        self.max = max_rollbacks
        self.used = 0
        self.fault_step = 0

    def spend(self, step: int) -> Action:
        """ROLLBACK for a fault at ``step``, or STOP once the budget is spent."""
        self.used += 1
        self.fault_step = max(self.fault_step, step)
        return Action.ROLLBACK if self.used <= self.max else Action.STOP

    def progress(self, step: int) -> None:
        """Call after every completed step."""
        if step > self.fault_step:
            self.used = 0


@dataclass
class Agreement:
    action: Action
    verdict: Verdict | None  # this rank's strongest verdict, when it is the one agreed on
    before: int | None  # ROLLBACK: the checkpoint must precede this step (None: the newest)
    skip_data: bool
    winner: int  # the rank whose verdict was agreed on (it records the event)
    lateness: list[float]  # per rank: seconds after the first rank that it reached the agreement
    verified: bool = False  # ROLLBACK: to a disk checkpoint (verified when written), not a snapshot
    stop_requested: bool = False  # some rank was asked to stop (a preemption signal)
    metrics: dict = field(default_factory=dict)  # this rank's guards' figures for the step


def agree(verdicts: list[Verdict], world, stop_requested: bool = False) -> Agreement:
    """The strongest verdict over all ranks (with its rollback target), each rank's
    arrival time and whether any rank was asked to stop: one all-gather of six numbers
    per rank per step."""
    mine = max((v for v in verdicts if v.action != Action.GO), key=lambda v: v.action, default=None)
    row = [
        float(mine.action) if mine else 0.0,
        time.time(),
        float(mine.before) if mine and mine.before is not None else -1.0,
        1.0 if mine and mine.skip_data else 0.0,
        1.0 if stop_requested else 0.0,
        1.0 if mine and mine.verified else 0.0,
    ]
    if not world.distributed:
        table = torch.tensor([row], dtype=torch.float64)
    else:
        local = torch.tensor(row, dtype=torch.float64)
        everyone = [torch.empty_like(local) for _ in range(world.world_size)]
        dist.all_gather(everyone, local)
        table = torch.stack(everyone)
    winner = int(table[:, 0].argmax().item())  # the first rank with the strongest action
    action = Action(int(table[winner, 0].item()))
    before = int(table[winner, 2].item())
    arrivals = table[:, 1]
    return Agreement(
        action=action,
        verdict=mine if mine is not None and mine.action == action else None,
        before=None if before < 0 else before,
        skip_data=bool(table[winner, 3].item()),
        winner=winner,
        verified=bool(table[winner, 5].item()),
        lateness=(arrivals - arrivals.min()).tolist(),
        stop_requested=bool(table[:, 4].max().item()),
        metrics={k: v for verdict in verdicts for k, v in verdict.metrics.items()},
    )
