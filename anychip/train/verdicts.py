"""Carrying out the guards' agreed verdict on a step, when it is not GO. No weight has
changed in the step: every action starts by dropping its gradients.

    RETRY     the same batch again (a transient fault leaves no trace)
    SKIP      the step counts, its batch is dropped (it still gets its checkpoint)
    ROLLBACK  the newest snapshot or checkpoint before the fault (a checkpoint when the weights
              themselves are suspect); optionally skip the batches since
    STOP      end the run with GuardStop, which says why
"""

from __future__ import annotations

import time

from rich.markup import escape

from ..errors import GuardStop
from ..guards.base import Action, Agreement
from ..guards.setup import Guards
from ..parallel import unwrap
from .hooks import Hooks, TrainState
from .runlog import append_event


def carry_out(state: TrainState, agreed: Agreement, guards: Guards, hooks: Hooks) -> None:
    step, log = state.step, state.log
    state.optimizer.zero_grad(set_to_none=True)
    unwrap(state.model).clear_expert_loads()
    v = agreed.verdict
    reason = v.reason if v else f"a guard of rank {agreed.winner}"
    if v is not None and v.event and state.world.rank == agreed.winner:  # one record per fault
        fields = {"step": step, "action": agreed.action.name.lower(), "guard": v.guard, **v.detail}
        if state.world.is_main:
            log.event(v.event, **fields)
        else:
            append_event(state.run_dir, v.event, reporting_rank=state.world.rank, **fields)
    if agreed.action == Action.RETRY:
        state.step = step - 1  # the same batch again
    elif agreed.action == Action.SKIP:
        log.event("update_skipped", step=step, batch=state.data.stats["batches"], reason=reason)
        state.batch = None  # the step counts; its batch is dropped
        state.checkpointer.save(step)  # a skipped step still gets its checkpoint when one is due
    elif agreed.action == Action.STOP:
        raise GuardStop(f"step {step}: {reason}")
    else:
        roll_back(state, agreed, reason, guards, hooks)


def roll_back(state: TrainState, agreed: Agreement, reason: str, guards: Guards, hooks: Hooks) -> None:
    """Restore the newest good checkpoint before ``agreed.before``; with ``skip_data`` also
    skip the batches drawn since (the data window that led to the fault)."""
    step, log = state.step, state.log
    t0 = time.perf_counter()
    hooks("before_rollback", state)
    drawn = state.data.stats["batches"]
    state.checkpointer.wait()
    back = state.checkpointer.load_latest(before=agreed.before, disk_only=agreed.verified)
    if back is None:
        raise GuardStop(f"step {step}: {reason}; no checkpoint to roll back to")
    unwrap(state.model).clear_expert_loads()
    skipped = None
    if agreed.skip_data:
        first = state.data.stats["batches"] + 1
        for _ in range(first, drawn + 1):
            state.data.next_batch()
        skipped = [first, drawn]
        log.event("data_skipped", first_batch=first, last_batch=drawn, reason=reason)
    state.step, state.batch = back, None
    duration = time.perf_counter() - t0
    log.event("rollback", from_step=step, to_step=back, reason=reason, skipped=skipped, duration_s=duration)
    window = f", skipping batches {skipped[0]}-{skipped[1]}" if skipped else ""
    log.print(f"[yellow]step {step}: {escape(reason)}; rolled back to step {back}{window}[/yellow]")
    guards.rolled_back(back)
    hooks("after_rollback", state)
