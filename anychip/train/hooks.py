"""What the parts of a run share (``TrainState``) and the named points of the loop where
plug-ins run (``Hooks``): fault injection (anychip/chaos.py), the hang watchdog's heartbeat,
and tests and benchmarks that look at a step."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..device import Device
from ..eval import EvalResult
from ..parallel import World

HOOK_POINTS = (
    "on_start",
    "before_step",
    "after_backward",
    "before_update",
    "after_step",
    "before_rollback",
    "after_rollback",
    "on_end",
)


@dataclass
class TrainState:
    """What several parts of a run read: hooks, the checkpointer (what it saves), chaos, the
    data source of GRPO (the policy it samples from)."""

    run_dir: Path
    device: Device
    world: World
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: object  # TokenBatches or RolloutBatches: next_batch(), stats, state_dict()
    log: object  # RunLog
    tokenizer: object = None
    checkpointer: object = None  # Checkpointer
    ref_model: torch.nn.Module | None = None  # GRPO: the frozen reference policy (checkpointed)
    step: int = 0
    batch: dict | None = None  # the batch of the step in progress (kept for a retry)
    figures: dict = field(default_factory=dict)  # the objective's figures of the step in progress
    metrics: dict = field(default_factory=dict)  # what was logged of the last applied step
    eval: EvalResult | None = None  # held-out accuracy at the end
    preempted: bool = False  # stopped by a preemption, with a checkpoint of the last step


class Hooks:
    """Named points of the loop; each registered callable gets the TrainState."""

    def __init__(self):
        self._fns: dict[str, list[Callable]] = defaultdict(list)
        self._closers: list[Callable[[], None]] = []

    def add(self, point: str, fn: Callable) -> None:
        if point not in HOOK_POINTS:
            raise ValueError(f"hook point {point!r} is unknown; known: {', '.join(HOOK_POINTS)}")
        self._fns[point].append(fn)

    def __call__(self, point: str, state: TrainState) -> None:
        for fn in self._fns[point]:
            fn(state)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Called once when the run ends, however it ends (e.g. stop a watchdog process)."""
        self._closers.append(fn)

    def add_heartbeat(self, beat) -> None:
        """The hang watchdog's heartbeat (anychip.guards.heartbeat) beats at these points."""
        for point in ("before_update", "before_rollback", "after_step", "after_rollback"):
            self.add(point, getattr(beat, point))
        self.add_closer(beat.close)

    def close(self) -> None:
        closers, self._closers = self._closers, []
        for fn in closers:
            fn()
