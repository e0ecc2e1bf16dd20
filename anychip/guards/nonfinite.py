"""NaN/Inf in the loss or the gradients: never let it reach the weights.

First time at a step: drop the gradients and compute the same batch again (a transient
fault leaves no trace: the run stays bit-identical). Non-finite again: the batch is the
cause; skip it. ``nonfinite_max`` steps in a row: roll back to the last checkpoint;
``max_rollbacks`` rollbacks without getting past the fault: stop."""

from __future__ import annotations

import math

from .base import Action, Guard, RollbackBudget, StepView, Verdict


class NonFinite(Guard):
    def __init__(self, cfg):
        self.max_in_row = cfg.nonfinite_max
        self.retried: int | None = None  # step already retried once
        self.in_row = 0
        self.budget = RollbackBudget(cfg.max_rollbacks)

    def judge(self, view: StepView) -> Verdict | None:
        loss, norm = view.figures["loss"], view.grad_norm
        if math.isfinite(loss) and math.isfinite(norm):
            return None
        step = view.step
        if self.retried != step:
            self.retried, action = step, Action.RETRY
        else:
            self.in_row += 1
            action = Action.SKIP
            if self.in_row >= self.max_in_row:
                self.in_row = 0
                action = self.budget.spend(step)
        reason = f"non-finite loss {loss} / gradient norm {norm}"
        if action == Action.STOP:
            reason += f" after {self.budget.max} rollbacks"
        detail = {"loss": str(loss), "grad_norm": str(norm)}
        return Verdict(action, "nonfinite", reason, before=step, event="nonfinite", detail=detail)

    def completed(self, view: StepView, metrics: dict, agreement) -> None:
        self.retried = None
        self.in_row = 0
        self.budget.progress(view.step)

    def rolled_back(self, step: int) -> None:
        self.retried = None
