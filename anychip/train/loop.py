"""The training loop: one loop for every chip, objective and number of processes.

    build (anychip.train.build): device, process group, model, FSDP2/DDP, AdamW, data,
        objective, checkpointer, guards, watchdog, chaos; resume; the other pools
    while step < steps:                                        hooks: before_step ...
        pools: the quorum; a pool that comes back takes a live one's state (anychip.pools)
        gradients of the objective over the micro-batches      (anychip.train.step)
        pools: gradients summed over them (a pool lost meanwhile: the step again)
        clip; the guards' verdict, agreed over ranks           not GO: carry it out (verdicts.py)
        lr; optimizer step (DiLoCo: the pools' exchange); balancing-bias update
        metrics, held-out loss, checkpoint, snapshot when due  ... after_step
        stop here if a preemption was asked for
    finish (anychip.train.finish): final model, held-out accuracy

Each component decides when it is due (``checkpointer.save(step)`` saves only when
``checkpointer.due(step)``); the loop only fixes the order of the calls.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

from rich.markup import escape

from ..config import Config
from ..device import get_device
from ..events import append_event
from ..guards.base import Action, StepView
from ..parallel import abort_world, all_reduce_sum, close_world, first_failure, init_world, unwrap
from .build import Trainer, build, build_source
from .finish import finish
from .hooks import Hooks, TrainState
from .metrics import console_line
from .optim import lr_at, set_lr
from .preempt import Preemption
from .runlog import RunLog
from .step import clip_grad_norm, forward_backward
from .verdicts import carry_out


def train(
    cfg: Config, run_dir: str | Path, hooks: Hooks | None = None, generation: int = 0, failed_at: float | None = None
) -> TrainState:
    """Run ``cfg`` to the end in this process (one rank of the job); returns the final state.

    ``generation``: how many times this process restarted training in place after a fault
    (``anychip.launch``), the last one at ``failed_at`` (time.monotonic())."""
    run_dir = Path(run_dir)
    hooks = hooks or Hooks()
    device = get_device(None if cfg.device.type == "auto" else cfg.device.type)  # auto: ANYCHIP_DEVICE, then detection
    device.prepare_determinism(cfg.train.deterministic)  # before the first kernel (cuBLAS reads its workspace once)
    world = init_world(device, cfg.guards.collective_timeout_s, cfg.parallel, generation)
    t = cfg.train
    log = RunLog(run_dir, world.is_main, t.steps, cfg.log.tensorboard, cfg.log.progress, t.log_interval)
    preemption = Preemption()
    trainer = None
    failed = False
    try:
        trainer = build(cfg, run_dir, device, world, log, hooks, preemption, generation, failed_at)
        train_time = run(trainer)
        if train_time is not None:
            finish(trainer.state, cfg.eval, build_source(cfg, "heldout"), train_time)
            hooks("on_end", trainer.state)
        if trainer.state.checkpointer.snapshots is not None:
            trainer.state.checkpointer.snapshots.remove()  # done (or preempted, with a checkpoint of this step)
        if trainer.heartbeat is not None:
            trainer.heartbeat.done()
        return trainer.state
    except BaseException as e:
        failed = True
        with contextlib.suppress(AttributeError, TypeError):
            e.failed_at = time.monotonic()  # for a restart in this process (anychip.launch)
        # first of all, on record: this rank failed, and whether it was the first (the fault's origin)
        with contextlib.suppress(OSError):  # no run directory yet: nothing to record in
            append_event(
                run_dir,
                "worker_failed",
                rank=world.rank,
                origin=first_failure(world),
                step=trainer.state.step if trainer is not None else None,
                error=f"{type(e).__name__}: {e}",
            )
        if trainer is not None and trainer.heartbeat is not None:  # the teardown and a restart are not a hang
            with contextlib.suppress(OSError):
                trainer.heartbeat.beat(trainer.state.step, "failed", cfg.guards.watchdog_startup_s)
        hooks.close()  # the watchdog first: the wait below is not a hang
        if trainer is not None:
            trainer.state.checkpointer.wait(barrier=False)  # a good checkpoint in flight still commits
        log.event("run_end", status="error", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        preemption.close()
        hooks.close()
        log.close()
        if failed:
            abort_world(world)  # the peers waiting on this rank fail now, not at a timeout
        else:
            close_world(world)


def run(trainer: Trainer) -> float | None:
    """Train to the last step; returns the training time, None when a preemption stopped the run first."""
    state, hooks = trainer.state, trainer.hooks
    if trainer.guards.active and state.step == 0 and state.checkpointer.cfg.interval:
        state.checkpointer.save(0, force=True)  # something to roll back to before the first interval
    trainer.guards.started(state.step)
    hooks("on_start", state)
    t_start = time.perf_counter()
    while state.step < trainer.schedule.steps:
        applied = train_step(trainer)
        if applied and state.step % trainer.boundary == 0 and stop_requested(trainer):
            preempt(trainer)
            return None
    if trainer.heartbeat is not None:
        trainer.heartbeat.unwatched("finish")  # final commit, export and evaluation are not step-timed
    state.checkpointer.wait()
    return time.perf_counter() - t_start


def free_gradients(state) -> None:
    """Drop the step's gradients; on CPU also give the memory they and FSDP's gathers held back to
    the system, so the resident set between steps is the live state."""
    state.optimizer.zero_grad(set_to_none=True)
    state.device.release_freed_memory()


def train_step(trainer: Trainer) -> bool:
    """One optimizer step (or the guards' alternative to it); True when the update was applied."""
    state, hooks, log = trainer.state, trainer.hooks, trainer.state.log
    model, world = state.model, state.world
    trainer.meter.start()
    trainer.pools.join(state)  # the pools of this step; one behind the others takes their state
    step = state.step = state.step + 1
    if state.batch is None:  # a retried step keeps its batch
        state.batch = state.data.next_batch()
    hooks("before_step", state)
    result = forward_backward(
        model, state.batch, trainer.objective, trainer.micro, trainer.amp, state.device, world, trainer.pools.sum
    )
    state.figures = result.figures
    hooks("after_backward", state)
    if not trainer.pools.exchange(state):  # a pool failed during the exchange: the step again without it
        return False
    view = StepView(step, state.figures, clip_grad_norm(model, trainer.schedule.grad_clip), state.batch)
    hooks("before_update", state)  # guards judge the step before any weight changes
    agreement = trainer.guards.judge(view, trainer.preemption.asked) if trainer.guards.active else None
    if agreement is not None and agreement.action != Action.GO:
        carry_out(state, agreement, trainer.guards, hooks)
        return False
    check_finite(view, log)
    set_lr(state.optimizer, lr := lr_at(step, trainer.schedule))
    state.checkpointer.wait_staged()  # a checkpoint in flight has copied the weights we now change
    state.optimizer.step()
    if trainer.pools.took_state():  # DiLoCo: this pool came back and took a live pool's state
        return False
    free_gradients(state)
    loads = all_reduce_sum(unwrap(model).expert_loads().detach().float(), world)
    unwrap(model).update_balancing_bias(loads)
    state.batch = None
    extra = {**(agreement.metrics if agreement is not None else {}), **trainer.pools.metrics()}
    metrics = state.metrics = trainer.meter.measure(state.figures, result.work, lr, view.grad_norm, loads, extra)
    metrics.update(state.checkpointer.snapshot_stalls())  # since the last record
    if trainer.heldout.due(step):
        metrics["eval_loss"] = trainer.heldout(model)
    log.metrics(step, metrics)
    log.expert_load(step, loads, trainer.meter.moe_names)  # the report's heatmaps (bounded in size)
    if trainer.references is not None and trainer.references.due(step):
        trainer.references.reset(step)
    state.checkpointer.save(step)
    state.checkpointer.snapshot(step)  # in shared memory: what a restart resumes from
    trainer.guards.completed(view, metrics, agreement)
    hooks("after_step", state)
    log.advance(step, f"loss {state.figures['loss']:.3f}")
    if step % log.log_interval == 0 or step == 1 or step == trainer.schedule.steps:
        log.print(console_line(step, trainer.objective.headline(metrics), metrics))
    return True


def check_finite(view: StepView, log) -> None:
    """Without guards a non-finite step stops the run before the update (nothing is changed)."""
    loss = view.figures["loss"]
    if math.isfinite(loss) and math.isfinite(view.grad_norm):
        return
    log.event("nonfinite", step=view.step, loss=str(loss), grad_norm=str(view.grad_norm), action="stop")
    raise FloatingPointError(
        f"step {view.step}: loss {loss}, gradient norm {view.grad_norm}; stopping before the update "
        "(weights and checkpoints are untouched)"
    )


def stop_requested(trainer: Trainer) -> bool:
    """Whether any rank was asked to stop: the guards' agreement carried it when guarded."""
    if trainer.guards.active:
        return trainer.guards.last.stop_requested
    return trainer.preemption.requested(trainer.state.world)


def preempt(trainer: Trainer) -> None:
    """Stop at this step boundary: a checkpoint of this step, a ``preempted`` event, no final export."""
    state, p = trainer.state, trainer.preemption
    step, log, checkpointer = state.step, state.log, state.checkpointer
    if trainer.heartbeat is not None:
        trainer.heartbeat.beat(step, "preempt", trainer.heartbeat.cfg.watchdog_startup_s)  # a checkpoint write
    if not checkpointer.due(step):  # else the save of this step is already under way
        checkpointer.save(step, force=True)
    checkpointer.wait()
    saved = checkpointer.step_dir(step)
    where = str(saved) if saved.is_dir() else None
    stop_s = time.monotonic() - p.since if p.since is not None else None
    log.event("preempted", step=step, signal=p.signal, checkpoint=where, stop_s=stop_s)
    log.event("run_end", status="preempted", steps=step)
    log.print(
        f"preempted ({p.signal or 'signal on another rank'}) after step {step}; checkpoint "
        f"{escape(where) if where else 'NOT saved'}; continue with: anychip train --resume "
        f"{escape(str(state.run_dir))}"
    )
    state.preempted = True
