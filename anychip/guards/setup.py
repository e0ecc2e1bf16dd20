"""Build the guards ``cfg.guards`` enables and register them on the loop's hooks."""

from __future__ import annotations

from .heartbeat import Heartbeat
from .nonfinite import NonFinite
from .sdc import RecomputeAudit, ReplicaCheck
from .spike import Spike
from .straggler import Straggler


def install(state, hooks) -> None:
    g, world = state.cfg.guards, state.world
    guards = []
    if g.nonfinite:
        guards.append(NonFinite(g))
    if g.spike:
        guards.append(Spike(g))
    replicas = world.distributed and state.cfg.parallel.strategy == "ddp"
    if g.replica_check_interval and replicas:  # FSDP keeps one copy of each shard: nothing to compare
        guards.append(ReplicaCheck(g))
    if g.audit_interval:
        guards.append(RecomputeAudit(g, state.device))
    if g.straggler_interval and world.distributed:
        guards.append(Straggler(g))
    for guard in guards:
        for point in ("on_start", "before_step", "before_update", "after_step", "after_rollback"):
            fn = getattr(guard, point, None)
            if fn is not None:
                hooks.add(point, fn)
    if g.watchdog:
        beat = Heartbeat(state.run_dir, world.rank, g, state.cfg)
        for point in ("before_update", "before_rollback", "after_step", "after_rollback"):
            hooks.add(point, getattr(beat, point))
        hooks.add_closer(beat.close)
        state.heartbeat = beat
    state.guarded = bool(guards)  # verdicts to agree on; the watchdog alone needs no agreement
    state.log.event("guards", installed=[type(x).__name__ for x in guards] + (["Watchdog"] if g.watchdog else []))
