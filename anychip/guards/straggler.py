"""Stragglers: which rank holds the others back.

Every step the ranks agree on the guards' verdicts in one all-gather that also carries
each rank's arrival time; a rank that arrives late has done its part of the step more
slowly (the others wait for it in the collectives that follow). Every
``straggler_interval`` steps each rank's time is estimated as the median step time
minus what it waited for the last rank to arrive, and a rank slower than the median of
these by ``straggler_factor`` is flagged: a ``straggler`` event and the metric
``straggler_ratio``. Flagging does not change the run.

What this sees: slowness between two collectives that the slow rank alone pays (host
work, data, a slow device step). Compute that is already waited for inside FSDP/DDP's
own collectives shows as a slower job for every rank; per-kernel device timing would be
needed to attribute it."""

from __future__ import annotations

import statistics

from .base import Action, Guard, StepView, Verdict


class Straggler(Guard):
    def __init__(self, cfg, log):
        self.log = log
        self.interval = cfg.straggler_interval
        self.factor = cfg.straggler_factor
        self.lateness: list[list[float]] = []
        self.step_times: list[float] = []

    def completed(self, view: StepView, metrics: dict, agreement) -> None:
        if agreement is not None:
            self.lateness.append(agreement.lateness)
            self.step_times.append(metrics["step_time"])

    def judge(self, view: StepView) -> Verdict | None:
        """Every ``interval`` steps: judge the steps measured since the last verdict (a
        figure and events; the run goes on)."""
        if view.step % self.interval or len(self.lateness) < 2:
            return None
        n = len(self.lateness[0])
        late = [statistics.mean(row[r] for row in self.lateness) for r in range(n)]
        step_time = statistics.median(self.step_times)
        own = [step_time - (max(late) - x) for x in late]  # each rank's time without its waiting
        med = statistics.median(own)
        ratio = max(own) / med if med > 0 else 1.0
        first, last = view.step - len(self.lateness), view.step - 1
        for r, t in enumerate(own):
            if med > 0 and t > self.factor * med:
                self.log.event(
                    "straggler",
                    step=view.step,
                    rank=r,
                    ratio=t / med,
                    lateness_s=late[r],
                    step_time_s=step_time,
                    steps=[first, last],
                )
                self.log.print(
                    f"[yellow]rank {r} is a straggler: {t / med:.2f}x the median rank over steps {first}-{last} "
                    f"({late[r] * 1e3:.0f} ms late per step)[/yellow]"
                )
        self.lateness.clear()
        self.step_times.clear()
        return Verdict(Action.GO, "straggler", "", metrics={"straggler_ratio": ratio})

    def rolled_back(self, step: int) -> None:
        self.lateness.clear()
        self.step_times.clear()
