"""The training loop: one loop for every chip and any number of processes.

    setup: device -> process group -> tokenizer, model -> FSDP2/DDP -> AdamW -> data
    while step < steps:
        batch            = data.next_batch()                     hook: before_step
        forward/backward over micro-batches, loss / global tokens  hook: after_backward
        clip gradients                                            hook: before_update
        guards' verdicts agreed over ranks: go | retry | skip | roll back | stop
        lr schedule; optimizer step
        balancing-bias update from the all-reduced expert loads
        metrics (loss, lr, grad norm, tokens/s, MFU, memory); checkpoint   hook: after_step
    final model (Hugging Face format) and held-out accuracy       hook: on_end

Guards (anychip/guards), fault injection (anychip/chaos.py) and checkpoints plug into
the named hooks; the loop itself only carries out the agreed verdict.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.markup import escape

from ..chaos import install as install_chaos
from ..checkpoint import Checkpointer, checkpoint_due, step_dir
from ..config import Config
from ..data import JsonlCorpus, ReasoningTasks, TextCorpus, TokenBatches, load_tokenizer
from ..device import Device, get_device
from ..errors import CheckpointError, ConfigError, GuardStop
from ..eval import EvalResult, evaluate, heldout_loss, loss_due, reduce_result, shard
from ..export import load_init
from ..guards import install as install_guards
from ..guards.base import Action, Agreement, Verdict, agree
from ..models import DeepSeekV3, count_parameters, save_hf, training_flops_per_token
from ..models.deepseek.args import SHAPE_FREE
from ..models.hf import remove_save_leftovers
from ..parallel import World, all_reduce_sum, close_world, full_state_dict, init_world, parallelize, unwrap
from .optim import build_optimizer, lr_at, set_lr
from .preempt import Preemption
from .runlog import RunLog, append_event, read_jsonl

HOOK_POINTS = (
    "on_start", "before_step", "after_backward", "before_update", "after_step", "before_rollback", "after_rollback",
    "on_end",
)  # fmt: skip


class Hooks:
    """Named points of the loop; each registered callable gets the trainer state."""

    def __init__(self):
        self._fns: dict[str, list[Callable]] = defaultdict(list)

    def add(self, point: str, fn: Callable) -> None:
        if point not in HOOK_POINTS:
            raise ValueError(f"hook point {point!r} is unknown; known: {', '.join(HOOK_POINTS)}")
        self._fns[point].append(fn)

    def __call__(self, point: str, state: TrainState) -> None:
        for fn in self._fns[point]:
            fn(state)

    def add_closer(self, fn: Callable[[], None]) -> None:
        """Called once when the run ends, however it ends (e.g. stop a watchdog process)."""
        self._fns["_close"].append(fn)

    def close(self) -> None:
        for fn in self._fns.pop("_close", []):
            fn()


@dataclass
class TrainState:
    """What hooks may read (and guards, later, change)."""

    cfg: Config
    run_dir: Path
    device: Device
    world: World
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: TokenBatches
    log: RunLog
    tokenizer: object = None
    checkpointer: Checkpointer | None = None
    step: int = 0
    batch: dict | None = None  # the batch of the step in progress (kept for a retry)
    losses: dict = field(default_factory=dict)  # of the step in progress, before the update
    grad_norm: float = 0.0
    verdicts: list[Verdict] = field(default_factory=list)  # guards' judgements of the step in progress
    agreement: Agreement | None = None
    guarded: bool = False  # guards installed: verdicts are agreed over ranks every step
    heartbeat: object = None  # the hang watchdog's heartbeat writer (anychip.guards.heartbeat)
    metrics: dict = field(default_factory=dict)
    extra_metrics: dict = field(default_factory=dict)  # guards' figures for the step in progress
    eval: EvalResult | None = None
    ref_model: torch.nn.Module | None = None  # GRPO: the frozen reference policy (checkpointed)
    preemption: Preemption | None = None  # SIGTERM/SIGINT/SIGUSR2 asked the run to stop at a step boundary
    preempted: bool = False  # stopped by a preemption, with a checkpoint of the last step


def build_source(cfg: Config, split: str = "train"):
    d = cfg.data
    if d.source == "reasoning_gym":
        return ReasoningTasks(
            d.tasks,
            seed=cfg.train.seed,
            split=split,
            heldout_size=d.heldout_size,
            task_kwargs=d.task_options,
            reasoning=d.reasoning,
        )
    if split != "train":
        return None
    if d.source == "jsonl":
        return JsonlCorpus(d.path, d.text_field, d.prompt_field or None, d.completion_field or None)
    return TextCorpus(d.path)


def heldout_batches(cfg: Config, tokenizer, world: World) -> list[dict]:
    """The fixed batches of the periodic held-out loss (this rank's rows); none when
    ``eval.interval`` is 0, in GRPO runs, or for corpora without a held-out split."""
    source = build_source(cfg, "heldout") if cfg.eval.interval and cfg.train.mode != "grpo" else None
    if source is None:
        return []
    t = cfg.train
    data = TokenBatches(source, tokenizer, t.seq_len, t.global_batch, world.rank, world.world_size, t.mode)
    return [data.next_batch() for _ in range(cfg.eval.loss_batches)]


def build_model(cfg: Config, vocab_size: int, device: Device, world: World) -> DeepSeekV3:
    """Random init (identical on every rank) or the model ``init_from`` names: a Hugging Face
    directory, a run (its final model, else its newest checkpoint) or a checkpoint."""
    if cfg.model.init_from:
        with input_error("model.init_from", cfg.model.init_from):
            shape_free = {k: v for k, v in cfg.model.overrides.items() if k in SHAPE_FREE}
            # the config refused shape fields that differ from the model's own
            model = load_init(cfg.model.init_from, device=device.torch_device(world.local_rank), **shape_free)
        if model.args.vocab_size < vocab_size:
            raise ValueError(
                f"model.init_from {cfg.model.init_from}: vocab_size {model.args.vocab_size} < tokenizer's "
                f"{vocab_size} tokens"
            )
        return model
    args = cfg.model_args(vocab_size)
    with torch.device("meta"):
        model = DeepSeekV3(args)
    model.to_empty(device=device.torch_device(world.local_rank))
    model.init_weights(seed=cfg.train.seed)
    return model


def autocast_dtype(cfg: Config, device: Device) -> torch.dtype | None:
    """None: plain float32. ``auto`` picks the device's low-precision dtype on
    accelerators and float32 on CPU."""
    if cfg.train.dtype == "float32":
        return None
    if cfg.train.dtype == "auto":
        return None if device.type == "cpu" else device.autocast_dtype()
    dtype = getattr(torch, cfg.train.dtype)
    if not device.supports_dtype(dtype):
        raise ValueError(f"train.dtype = {cfg.train.dtype!r} is not supported on {device.type} ({device.name()})")
    return dtype


def train(cfg: Config, run_dir: str | Path, hooks: Hooks | None = None) -> TrainState:
    """Run ``cfg`` to the end in this process (one rank of the job); returns the final state."""
    run_dir = Path(run_dir)
    hooks = hooks or Hooks()
    device = get_device(None if cfg.device.type == "auto" else cfg.device.type)  # auto: ANYCHIP_DEVICE, then detection
    world = init_world(device, cfg.guards.collective_timeout_s)
    log = RunLog(run_dir, world.is_main, cfg.train.steps, cfg.log.tensorboard, cfg.log.progress, cfg.train.log_interval)
    preemption = Preemption()
    state = None
    try:
        state = _setup(cfg, run_dir, device, world, log, hooks, preemption)
        _run(state, hooks)
        return state
    except BaseException as e:
        hooks.close()  # the watchdog first: the wait below is not a hang
        if state is not None and state.checkpointer is not None:
            state.checkpointer.wait(barrier=False)  # a good checkpoint in flight still commits
        log.event("run_end", status="error", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        preemption.close()
        hooks.close()
        log.close()
        close_world(world)


def _setup(
    cfg: Config, run_dir: Path, device: Device, world: World, log: RunLog, hooks: Hooks, preemption: Preemption
) -> TrainState:
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device.manual_seed(cfg.train.seed)
    with input_error("data.tokenizer", cfg.data.tokenizer):
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, tokenizer.vocab_size, device, world)
    model.train()
    rl = cfg.train.mode == "grpo"
    ref = None
    if rl:
        from ..rl.grpo import make_reference, prepare_policy

        prepare_policy(model)
        ref = make_reference(model) if cfg.grpo.beta else None
    model = parallelize(model, world, cfg.parallel.strategy)
    optimizer = build_optimizer(model, cfg.train, device)
    data = None
    with input_error("data", _data_spec(cfg)):
        source = build_source(cfg, "train")
        if not rl:
            data = TokenBatches(
                source, tokenizer, cfg.train.seq_len, cfg.train.global_batch, world.rank, world.world_size,
                cfg.train.mode,
            )  # fmt: skip
    state = TrainState(cfg, run_dir, device, world, model, optimizer, data, log, tokenizer, ref_model=ref,
                       preemption=preemption)  # fmt: skip
    if rl:
        from ..rl.grpo import RolloutBatches

        with input_error("grpo.rewards", cfg.grpo.rewards):  # imports the reward functions it names
            state.data = RolloutBatches(state, source)
    args = unwrap(model).args
    total, active = count_parameters(args, include_mtp=True)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    _note_crash(run_dir, log, world)
    log.event(
        "run_start", config_digest=cfg.digest(), device=device.type, device_name=device.name(),
        world_size=world.world_size, strategy=cfg.parallel.strategy if world.distributed else "none",
        torch=torch.__version__, python=platform.python_version(), parameters=total, activated=active,
        restart=restart, pid=os.getpid(),
    )  # fmt: skip
    if restart:
        log.event("restart", count=restart)
    if getattr(unwrap(model), "mtp_initialized", False):
        log.event("mtp_initialized", init_from=cfg.model.init_from, layers=args.num_nextn_predict_layers)
        log.print(f"[yellow]{escape(cfg.model.init_from)} has no MTP weights: the MTP module starts freshly "
                  "initialised[/yellow]")  # fmt: skip
    if world.is_main:
        for leftover in remove_save_leftovers(run_dir / "final"):  # a final save cut short by a crash
            log.event("final_save_cleanup", path=str(leftover))
    state.checkpointer = Checkpointer(state, run_dir / "checkpoints")
    install_guards(state, hooks)  # the watchdog watches from here on
    install_chaos(state, hooks)
    state.checkpointer.cleanup()
    state.step = state.checkpointer.load_latest() or 0
    if state.step > cfg.train.steps:
        raise ConfigError(
            f"train.steps = {cfg.train.steps} is below the step of the checkpoint to resume, {state.step}; "
            "raise train.steps to continue"
        )
    if world.is_main:  # written once the config is known to fit the checkpoint
        (run_dir / "config.toml").write_text(cfg.to_toml())
    if state.step:
        log.print(f"resumed from the checkpoint of step {state.step}")
    log.print(
        f"anychip train: {cfg.model.preset} ({total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active) on "
        f"{world.world_size} x {device.type} ({device.name()}), {cfg.train.mode} on "
        f"{cfg.data.source}:{','.join(cfg.data.tasks) if cfg.data.source == 'reasoning_gym' else cfg.data.path}"
        f" -> {escape(str(run_dir))}"
    )
    return state


@contextlib.contextmanager
def input_error(key: str, value):
    """Errors that are the input's fault (a tokenizer file of garbage, an empty corpus, task
    options reasoning-gym refuses) become ConfigErrors naming the key and its value: the
    worker then writes fatal.json and no restart repeats them."""
    try:
        yield
    except (ConfigError, CheckpointError):
        raise
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{key} = {value!r}: {e}") from None


def _data_spec(cfg: Config) -> str:
    d = cfg.data
    if d.source == "reasoning_gym":
        return f"reasoning_gym tasks {d.tasks} with task_options {d.task_options}"
    return f"{d.source} corpus {d.path}"


def _note_crash(run_dir: Path, log: RunLog, world: World) -> None:
    """An earlier start of this run that never logged run_end died: record it."""
    if not world.is_main:
        return
    events = read_jsonl(run_dir / "events.jsonl")  # before this start logs anything
    starts = [i for i, e in enumerate(events) if e["event"] == "run_start"]
    if starts and not any(e["event"] == "run_end" for e in events[starts[-1] :]):
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        log.event("crash_detected", last_step=metrics[-1]["step"] if metrics else 0,
                  last_record=max(events[-1]["time"], metrics[-1]["time"] if metrics else 0))  # fmt: skip


def _run(state: TrainState, hooks: Hooks) -> None:
    cfg, world, device, log = state.cfg, state.world, state.device, state.log
    model, optimizer = state.model, state.optimizer
    core = unwrap(model)
    args = core.args
    rl = cfg.train.mode == "grpo"
    local_rows = cfg.train.global_batch // world.world_size
    micro = cfg.train.micro_batch or (0 if rl else local_rows)  # GRPO: 0 = the whole minibatch
    if not rl and local_rows % micro:
        raise ValueError(
            f"train.micro_batch = {micro} does not divide the {local_rows} sequences per rank "
            f"(global_batch {cfg.train.global_batch} / world size {world.world_size})"
        )
    amp = autocast_dtype(cfg, device)
    moe_names = core.moe_layer_names()
    flops_per_token, _, _ = training_flops_per_token(args, cfg.train.seq_len)
    peak = device.peak_flops(amp or torch.float32)
    tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
    step_fn = forward_backward
    if rl:
        from ..rl.grpo import policy_step, reset_reference

        def step_fn(model, batch, micro, amp, device, world):
            return policy_step(cfg, model, batch, micro, amp, device, world)

    heldout = heldout_batches(cfg, state.tokenizer, world)
    if state.guarded and state.step == 0 and cfg.checkpoint.interval:
        state.checkpointer.save(0)  # something to roll back to before the first interval
    hooks("on_start", state)
    t_start = time.perf_counter()
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        step = state.step = state.step + 1
        if state.batch is None:  # a retried step keeps its batch
            state.batch = state.data.next_batch()
        hooks("before_step", state)
        state.losses = losses = step_fn(model, state.batch, micro, amp, device, world)
        hooks("after_backward", state)
        grad_norm = _clip(model, cfg.train.grad_clip)
        state.grad_norm, state.verdicts = grad_norm, []
        hooks("before_update", state)  # guards judge the step before any weight changes
        if state.guarded:
            state.agreement = agree(state.verdicts, world, stop_requested=state.preemption.asked)
            if state.agreement.action != Action.GO:
                _carry_out(state, state.agreement, hooks)
                continue
        if not (math.isfinite(losses["loss"]) and math.isfinite(grad_norm)):  # unguarded: stop, change nothing
            log.event("nonfinite", step=step, loss=str(losses["loss"]), grad_norm=str(grad_norm), action="stop")
            raise FloatingPointError(
                f"step {step}: loss {losses['loss']}, gradient norm {grad_norm}; stopping before the update "
                "(weights and checkpoints are untouched)"
            )
        lr = lr_at(step, cfg.train)
        set_lr(optimizer, lr)
        state.checkpointer.wait_staged()  # a checkpoint in flight has copied the weights we now change
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loads = all_reduce_sum(core.expert_loads().detach().float(), world)
        core.update_balancing_bias(loads)
        state.batch = None
        device.synchronize()
        dt = time.perf_counter() - t0
        step_tokens, step_flops = losses.pop("step_tokens", tokens_per_step), losses.pop("step_flops", None)
        if step_flops is None:
            step_flops = flops_per_token * tokens_per_step
        state.metrics = {
            **losses,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time": dt,
            "tokens_per_s": step_tokens / dt,
            "mfu": step_flops / dt / (peak * world.world_size) if peak else None,
            "expert_imbalance": _imbalance(loads),
            "memory_peak_gb": device.memory_stats()["peak_allocated"] / 2**30,
            **state.extra_metrics,  # from guards, for this step
        }
        state.extra_metrics = {}
        if heldout and loss_due(cfg, step):
            state.metrics["eval_loss"] = heldout_loss(model, heldout, micro, amp, device.type, world)
        log.metrics(step, state.metrics)
        log.expert_load(step, loads, moe_names)  # the report's heatmaps (bounded in size)
        if rl and cfg.grpo.ref_reset_interval and step % cfg.grpo.ref_reset_interval == 0:
            reset_reference(state)
        if checkpoint_due(cfg, step):
            state.checkpointer.save(step)
        hooks("after_step", state)
        if _step_boundary(cfg, step) and _stop_requested(state):
            _preempt(state)
            return
        log.advance(step, f"loss {losses['loss']:.3f}")
        if step % cfg.train.log_interval == 0 or step == 1 or step == cfg.train.steps:
            m = state.metrics
            mfu = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "n/a"
            if rl:
                log.print(
                    f"step {step:5d}  reward {m['reward']:.3f}  accuracy {m['accuracy']:.3f}  kl {m['kl']:.4f}  "
                    f"clip {m['clip_fraction']:.3f}  length {m['response_length']:.1f}  entropy {m['entropy']:.3f}  "
                    f"lr {lr:.2e}  grad {grad_norm:.2f}  {m['tokens_per_s']:,.0f} tok/s  MFU {mfu}"
                )
                continue
            log.print(
                f"step {step:5d}  loss {m['loss']:.4f}  lm {m['lm_loss']:.4f}  lr {lr:.2e}  "
                f"grad {grad_norm:.2f}  {m['tokens_per_s']:,.0f} tok/s  MFU {mfu}  "
                f"experts max/mean {m['expert_imbalance']:.2f}"
                + (f"  held-out {m['eval_loss']:.4f}" if "eval_loss" in m else "")
            )
    if state.heartbeat is not None:
        state.heartbeat.unwatched("finish")  # final commit, export and evaluation are not step-timed
    state.checkpointer.wait()
    train_time = time.perf_counter() - t_start
    _finish(state, train_time)
    hooks("on_end", state)


def _stop_requested(state: TrainState) -> bool:
    """Whether any rank was asked to stop: known from this step's agreement when guarded."""
    if state.guarded:
        return state.agreement.stop_requested
    return state.preemption.requested(state.world)


def _step_boundary(cfg: Config, step: int) -> bool:
    """Whether a run may stop after ``step`` and resume exactly: GRPO only between rollout batches."""
    return cfg.train.mode != "grpo" or step % (cfg.grpo.iterations * cfg.grpo.minibatches) == 0


def _preempt(state: TrainState) -> None:
    """Stop at this step boundary: a checkpoint of this step, a ``preempted`` event, no final export."""
    cfg, step, log, p = state.cfg, state.step, state.log, state.preemption
    if state.heartbeat is not None:
        state.heartbeat.beat(step, "preempt", cfg.guards.watchdog_startup_s)  # a checkpoint write
    if not checkpoint_due(cfg, step):  # else the save of this step is already under way
        state.checkpointer.save(step)
    state.checkpointer.wait()
    saved = step_dir(state.checkpointer.root, step)
    log.event("preempted", step=step, signal=p.signal, checkpoint=str(saved) if saved.is_dir() else None,
              stop_s=time.monotonic() - p.since if p.since is not None else None)  # fmt: skip
    log.event("run_end", status="preempted", steps=step)
    log.print(f"preempted ({p.signal or 'signal on another rank'}) after step {step}; checkpoint "
              f"{escape(str(saved)) if saved.is_dir() else 'NOT saved'}; continue with: anychip train --resume "
              f"{escape(str(state.run_dir))}")  # fmt: skip
    state.preempted = True


def _carry_out(state: TrainState, agreed: Agreement, hooks: Hooks) -> None:
    """Act on a verdict other than GO; no weight has changed in this step."""
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
        return
    if agreed.action == Action.SKIP:
        log.event("update_skipped", step=step, batch=state.data.stats["batches"], reason=reason)
        state.batch = None  # the step counts; its batch is dropped
        if checkpoint_due(state.cfg, step):
            state.checkpointer.save(step)  # a skipped step still gets its checkpoint
        return
    if agreed.action == Action.STOP:
        raise GuardStop(f"step {step}: {reason}")
    # ROLLBACK: the newest good checkpoint before the fault; optionally skip the data since
    t0 = time.perf_counter()
    hooks("before_rollback", state)
    drawn = state.data.stats["batches"]
    state.checkpointer.wait()
    back = state.checkpointer.load_latest(before=agreed.before)
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
    log.event("rollback", from_step=step, to_step=back, reason=reason, skipped=skipped,
              duration_s=time.perf_counter() - t0)  # fmt: skip
    log.print(f"[yellow]step {step}: {escape(reason)}; rolled back to step {back}"
              + (f", skipping batches {skipped[0]}-{skipped[1]}" if skipped else "") + "[/yellow]")  # fmt: skip
    hooks("after_rollback", state)


def forward_backward(model, batch: dict, micro: int, amp, device: Device, world: World) -> dict:
    """Gradients of the mean loss over every label token of the global batch.

    Each micro-batch contributes its loss *sums* divided by the global token counts
    (all-reduced up front), times the world size because data parallelism averages
    gradients over ranks: the result equals one big batch on one process."""
    core = unwrap(model)
    args = core.args
    ids, labels = batch["input_ids"], batch["labels"]
    dev = core.embed_tokens.weight.device
    depth = len(core.mtp) if args.mtp_loss_weight else 0
    counts = [(labels != -100).sum()] + [(labels[:, k:] != -100).sum() for k in range(1, depth + 1)]
    counts = all_reduce_sum(torch.stack(counts).double(), world).clamp(min=1)
    rows_global = ids.shape[0] * world.world_size
    sums = torch.zeros(2 + depth, dtype=torch.float64)  # lm, mtp_1..D, balance
    chunks = range(0, ids.shape[0], micro)
    for i, start in enumerate(chunks):
        last = i == len(chunks) - 1
        x, y = ids[start : start + micro].to(dev), labels[start : start + micro].to(dev)
        with no_sync(model, last):
            with autocast(device, amp):
                out = model(x, labels=y, reduction="sum")
            objective = out.lm_loss / counts[0].item()
            for k, term in enumerate(out.mtp_losses, start=1):
                objective = objective + args.mtp_loss_weight / depth * term / counts[k].item()
            if out.balance_loss is not None:
                objective = objective + out.balance_loss * x.shape[0] / rows_global
            (objective * world.world_size).backward()
        sums[0] += out.lm_loss.item()
        for k, term in enumerate(out.mtp_losses, start=1):
            sums[k] += term.item()
        if out.balance_loss is not None:
            sums[-1] += out.balance_loss.item() * x.shape[0] / rows_global
    sums = all_reduce_sum(sums, world)
    lm = sums[0].item() / counts[0].item()
    mtp = [sums[k].item() / counts[k].item() for k in range(1, depth + 1)]
    loss = lm + (args.mtp_loss_weight * sum(mtp) / depth if depth else 0.0) + sums[-1].item()
    out = {"loss": loss, "lm_loss": lm, "tokens": int(counts[0].item())}
    if mtp:
        out["mtp_loss"] = sum(mtp) / depth
    if args.seq_aux_loss_alpha:
        out["balance_loss"] = sums[-1].item()
    return out


def no_sync(model, last: bool):
    """Gradient-sync control of one micro-batch: DDP's ``no_sync`` or FSDP2's
    ``set_requires_gradient_sync(False)`` on all but the ``last`` micro-batch."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _ResyncFSDP(model)
    return contextlib.nullcontext()


class _ResyncFSDP(contextlib.AbstractContextManager):
    def __init__(self, model):
        self.model = model

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)


def autocast(device: Device, dtype):
    """torch.autocast on ``device`` at ``dtype``; nothing when ``dtype`` is None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _clip(model, max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.grad is not None], max_norm if max_norm > 0 else float("inf")
    )
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def _imbalance(loads: torch.Tensor) -> float:
    if loads.numel() == 0:
        return 1.0
    mean = loads.mean(dim=1).clamp(min=1e-9)
    return float((loads.max(dim=1).values / mean).max())


def _full_model(state: TrainState) -> DeepSeekV3:
    """A plain (unsharded) copy of the model on every rank, for saving and evaluation."""
    model, world = state.model, state.world
    core = unwrap(model)
    if not world.distributed:
        return core
    plain = DeepSeekV3(core.args).to(state.device.torch_device(world.local_rank))
    plain.load_state_dict(full_state_dict(model, world))
    plain.materialize_counters()
    return plain


def _finish(state: TrainState, train_time: float) -> None:
    cfg, world, log = state.cfg, state.world, state.log
    final = _full_model(state)
    if world.is_main:
        save_hf(final, state.run_dir / "final", overwrite=True)
    heldout = build_source(cfg, "heldout")
    result = None
    if heldout is not None and cfg.eval.n:
        n = min(cfg.eval.n, len(heldout))
        examples = shard([heldout.example(i) for i in range(n)], world.rank, world.world_size)
        result = reduce_result(
            evaluate(final, state.tokenizer, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size), world
        )
        state.eval = result
        log.print(f"held-out accuracy: {result.accuracy:.1%} ({result.correct:g}/{result.n}; exactly right: "
                  f"{result.exact_accuracy:.1%}) on {escape(str(cfg.data.tasks))}")  # fmt: skip
        for s in result.samples[:3]:
            log.print(
                escape(f"  {s['prompt'].strip()!r} -> {s['output']!r} (answer {s['answer']}, score {s['score']:g})")
            )
        if world.is_main:
            (state.run_dir / "eval.json").write_text(
                json.dumps(
                    {
                        "accuracy": result.accuracy,
                        "exact_accuracy": result.exact_accuracy,
                        "correct": result.correct,
                        "n": result.n,
                        "tasks": cfg.data.tasks,
                        "samples": result.samples,
                    },
                    indent=2,
                )  # fmt: skip
            )
    log.event(
        "run_end", status="ok", steps=state.step, train_time_s=train_time,
        final_loss=state.metrics.get("loss"), accuracy=result.accuracy if result else None,
    )  # fmt: skip
