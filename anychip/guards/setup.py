"""The guards ``[guards]`` enables, and the one call the loop makes to them each step."""

from __future__ import annotations

from .base import Agreement, Guard, StepView, agree
from .nonfinite import NonFinite
from .sdc import RecomputeAudit, ReplicaCheck
from .spike import Spike
from .straggler import Straggler


class Guards:
    """The run's guards, asked in a fixed order (the same on every rank: some of them
    communicate). Without any, ``active`` is False and no agreement is needed."""

    def __init__(self, guards: list[Guard], world):
        self.guards, self.world = guards, world
        self.last: Agreement | None = None  # of the latest step judged

    @property
    def active(self) -> bool:
        return bool(self.guards)

    def judge(self, view: StepView, stop_requested: bool) -> Agreement:
        """Every guard's verdict on the step in progress, agreed over ranks (one all-gather)."""
        verdicts = [v for guard in self.guards if (v := guard.judge(view)) is not None]
        self.last = agree(verdicts, self.world, stop_requested=stop_requested)
        return self.last

    def started(self, step: int) -> None:
        for guard in self.guards:
            guard.started(step)

    def completed(self, view: StepView, metrics: dict, agreement: Agreement | None) -> None:
        for guard in self.guards:
            guard.completed(view, metrics, agreement)

    def rolled_back(self, step: int) -> None:
        for guard in self.guards:
            guard.rolled_back(step)


def build_guards(g, *, strategy: str, run_dir, model, device, amp, objective, world, log, checkpoint_due) -> Guards:
    """The guards the ``[guards]`` section ``g`` switches on (the watchdog is separate: it
    is a process, see ``anychip.guards.heartbeat``)."""
    guards: list[Guard] = []
    if g.nonfinite:
        guards.append(NonFinite(g))
    if g.spike:
        guards.append(Spike(g, run_dir))
    if g.replica_check_interval and world.distributed and strategy == "ddp":  # FSDP keeps one copy of each shard
        guards.append(ReplicaCheck(g, model, world, checkpoint_due))
    if g.audit_interval:
        guards.append(RecomputeAudit(g, model, device, amp, objective, world.rank))
    if g.straggler_interval and world.distributed:
        guards.append(Straggler(g, log))
    installed = [type(x).__name__ for x in guards] + (["Watchdog"] if g.watchdog else [])
    log.event("guards", installed=installed)
    return Guards(guards, world)
