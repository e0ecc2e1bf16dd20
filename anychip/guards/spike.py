"""Loss and gradient-norm spikes, by a robust detector: the median and the median absolute
deviation (MAD) of the last ``spike_window`` good steps. A step is a spike when

    (x - median) / (1.4826 * MAD) > threshold   and   x > median * (1 + min_rise)

(the second test keeps a flat, low-noise stretch from calling a tiny bump a spike).
On a spike the run rolls back to the newest checkpoint before it and skips the batches
drawn since (the data window that led there; recorded as ``data_skipped``), as PaLM did
by hand. ``max_rollbacks`` spikes without getting past the step: stop."""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path

from ..events import METRIC, read_jsonl_tail
from .base import Action, Guard, RollbackBudget, StepView, Verdict


def robust_z(history, x: float) -> tuple[float, float, float]:
    """(z, median, MAD) of ``x`` against ``history``; z is inf when MAD is 0 and x > median."""
    med = statistics.median(history)
    mad = statistics.median(abs(h - med) for h in history)
    if mad == 0:
        return (float("inf") if x > med else 0.0), med, mad
    return (x - med) / (1.4826 * mad), med, mad


class Spike(Guard):
    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self.history: deque[tuple[int, float, float]] = deque(maxlen=cfg.spike_window)  # (step, loss, grad norm)
        self.budget = RollbackBudget(cfg.max_rollbacks)

    def _check(self, name: str, col: int, x: float, threshold: float, min_rise: float):
        if threshold <= 0 or len(self.history) < self.cfg.spike_min_history:
            return None
        z, med, mad = robust_z([h[col] for h in self.history], x)
        if z > threshold and x > med * (1 + min_rise):
            return {"metric": name, "value": x, "median": med, "mad": mad, "z": z}
        return None

    def judge(self, view: StepView) -> Verdict | None:
        loss, norm = view.figures["loss"], view.grad_norm
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return None  # the non-finite guard's case
        g = self.cfg
        found = self._check("loss", 1, loss, g.spike_threshold, g.spike_min_rise) or self._check(
            "grad_norm", 2, norm, g.spike_grad_threshold, g.spike_grad_min_rise
        )
        if found is None:
            return None
        action = self.budget.spend(view.step)
        reason = f"{found['metric']} spike {found['value']:.4g} (median {found['median']:.4g}, z {found['z']:.1f})"
        if action == Action.STOP:
            reason += f"; {g.max_rollbacks} rollbacks did not get past it"
        return Verdict(action, "spike", reason, before=view.step, skip_data=True, event="spike", detail=found)

    def completed(self, view: StepView, metrics: dict, agreement) -> None:
        self.history.append((view.step, view.figures["loss"], view.grad_norm))
        self.budget.progress(view.step)

    def started(self, step: int) -> None:
        """A resumed run starts with the history of the steps it resumes after: the last records of
        metrics.jsonl (read from its end until the window is full), malformed ones left out."""
        window = self.cfg.spike_window

        def usable(records: list[dict]) -> dict[int, dict]:  # the last record of each step up to ``step``
            return {
                m["step"]: m
                for m in records
                if m["step"] <= step and all(isinstance(m.get(k), int | float) for k in ("loss", "grad_norm"))
            }

        keys = ("step", "loss", "grad_norm")
        enough = lambda records: len(usable(records)) >= window  # noqa: E731
        last = usable(read_jsonl_tail(self.run_dir / "metrics.jsonl", schema=METRIC, keys=keys, enough=enough))
        for done in sorted(last)[-window:]:
            self.history.append((done, last[done]["loss"], last[done]["grad_norm"]))

    def rolled_back(self, step: int) -> None:
        kept = [h for h in self.history if h[0] <= step]
        self.history.clear()
        self.history.extend(kept)
