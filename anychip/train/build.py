"""Everything a run needs before its first step, in this order (the order fixes the random
numbers, so it is part of the run's trajectory):

    seed -> tokenizer -> model on the meta device -> [GRPO: freeze MTP]
    -> activation checkpointing -> compile -> FSDP2/DDP -> this rank's shards materialised
       (random init or model.init_from; before the layout under DDP and on one process)
    -> [GRPO: the reference, sharded like the policy] -> AdamW -> data (token batches, or GRPO rollouts) -> run_start event
    -> objective -> checkpointer -> guards and the hang watchdog -> chaos
    -> resume from the newest checkpoint -> held-out loss batches

Each component gets its own config section (and the run's last step where it must know it).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from ..chaos import install as install_chaos
from ..checkpoint import Checkpointer, RunIdentity
from ..config import Config, TrainConfig
from ..data import JsonlCorpus, ReasoningTasks, TextCorpus, TokenBatches, load_tokenizer
from ..device import Device
from ..errors import CheckpointError, ConfigError
from ..eval import HeldoutLoss
from ..events import EVENT, METRIC, keep_fitting, read_jsonl_tail
from ..guards.heartbeat import Heartbeat
from ..guards.setup import Guards, build_guards
from ..launcher_env import POOL_ATTEMPT
from ..models import DeepSeekV3, count_parameters
from ..models.deepseek.parallelize import apply_activation_checkpointing, apply_compile
from ..models.hf import remove_save_leftovers
from ..parallel import World, all_gather_floats, parallelize, unwrap
from ..pools.sync import NoPools, PoolSync, data_shard, pool_index
from ..rl.grpo import ReferenceResets, RolloutBatches, make_reference, prepare_policy, updates_per_rollout
from ..rl.policy import PolicyLoss
from ..runfiles import write_file
from ..snapshot import open_snapshots
from .hooks import Hooks, TrainState
from .lm import NextTokenLoss
from .metrics import StepMeter
from .optim import build_optimizer
from .preempt import Preemption
from .runlog import RunLog, append_event, read_jsonl
from .shards import materialize, model_source, sharded_reference
from .step import Objective, autocast_dtype


@dataclass
class Trainer:
    """A built run: the shared state and the components the loop calls, each once per step."""

    state: TrainState
    hooks: Hooks
    objective: Objective
    guards: Guards
    heartbeat: Heartbeat | None
    heldout: HeldoutLoss
    meter: StepMeter
    preemption: Preemption
    references: ReferenceResets | None  # GRPO with a reference policy
    pools: NoPools  # the other pools of the run (anychip.pools); NoPools: none
    schedule: TrainConfig  # the learning-rate schedule, gradient clipping and the last step
    boundary: int  # a run may stop (and resume exactly) only after a multiple of this many steps
    micro: int  # sequences per forward pass and rank; 0: the whole batch
    amp: torch.dtype | None  # autocast dtype; None: float32


def build(
    cfg: Config,
    run_dir: Path,
    device: Device,
    world: World,
    log: RunLog,
    hooks: Hooks,
    preemption,
    generation: int = 0,
    failed_at: float | None = None,
) -> Trainer:
    """Build the run of ``cfg`` on this rank; resumes from the newest snapshot or checkpoint
    of ``run_dir``. ``generation`` > 0: a restart in this process after the failure at
    ``failed_at`` (time.monotonic()). Input faults (a garbage tokenizer file, an empty corpus, task options
    reasoning-gym refuses) are ConfigErrors naming the key."""
    t = cfg.train
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    device.manual_seed(t.seed)
    with input_error("data.tokenizer", cfg.data.tokenizer):
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    with input_error("model.init_from", cfg.model.init_from):
        args, source = model_source(cfg, tokenizer.vocab_size)
    with torch.device("meta"):  # no memory: only this rank's shards are ever materialised
        model = DeepSeekV3(args)
    model.train()
    rl = t.mode == "grpo"
    if rl:
        prepare_policy(model)
    amp = autocast_dtype(t.dtype, device)
    reduce_dtype = getattr(torch, cfg.parallel.reduce_dtype)
    sharded = world.distributed and cfg.parallel.strategy == "fsdp"
    ref = None
    if not sharded:  # whole on every rank anyway; DDP broadcasts the weights when it wraps
        with input_error("model.init_from", cfg.model.init_from):
            materialize(model, source, t.seed, device, world)
        ref = make_reference(model) if rl and cfg.grpo.beta else None
    # the layout, outside the model and in this order: activation checkpointing, compile, data parallelism
    apply_activation_checkpointing(model, t.activation_checkpoint)
    apply_compile(model, t.compile, expert_parallel=cfg.parallel.ep > 1)
    model = parallelize(model, world, cfg.parallel.strategy, amp, reduce_dtype)
    if sharded:
        with input_error("model.init_from", cfg.model.init_from):
            materialize(model, source, t.seed, device, world)
        ref = sharded_reference(model, world, amp, reduce_dtype) if rl and cfg.grpo.beta else None
    optimizer = build_optimizer(model, t, device)
    state = TrainState(run_dir, device, world, model, optimizer, None, log, tokenizer, ref_model=ref)
    pool = pool_index(cfg)  # None: a run of one pool
    data_rank, data_ranks = data_shard(world, pool, cfg.pools.count)  # pools read one global stream
    with input_error("data", _data_spec(cfg)):
        source = build_source(cfg, "train")
        if not rl:
            state.data = TokenBatches(source, tokenizer, t.seq_len, t.global_batch, data_rank, data_ranks, t.mode)
    if rl:
        fsdp = cfg.parallel.strategy == "fsdp"
        with input_error("grpo.rewards", cfg.grpo.rewards):  # imports the reward functions it names
            state.data = RolloutBatches(cfg.grpo, t.micro_batch, fsdp, state, source, amp)
    _log_start(cfg, state, generation)

    core = unwrap(model)
    local_rows = t.global_batch // data_ranks
    micro = t.micro_batch or (0 if rl else local_rows)  # GRPO: 0 = the whole minibatch
    if not rl and local_rows % micro:
        raise ValueError(
            f"train.micro_batch = {micro} does not divide the {local_rows} sequences per rank "
            f"(global_batch {t.global_batch} / {data_ranks} ranks of all pools)"
        )
    if rl:
        objective = PolicyLoss(cfg.grpo, core.args)
    else:
        objective = NextTokenLoss(core.args, len(core.mtp), t.seq_len, t.global_batch // cfg.pools.count)
    identity = RunIdentity(cfg.to_toml(), cfg.digest(), t.seed)
    checkpointer = state.checkpointer = Checkpointer(state, run_dir / "checkpoints", cfg.checkpoint, t.steps, identity)
    boundary = updates_per_rollout(cfg.grpo) if rl else 1  # a run may stop and resume only after multiples of it
    if cfg.checkpoint.snapshot_interval:
        first_start = generation == 0 and not int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        c = cfg.checkpoint
        interval = math.lcm(c.snapshot_interval, boundary)  # GRPO: between rollout batches
        checkpointer.snapshots = open_snapshots(state, run_dir, interval, identity.digest, c.snapshot_async, first_start)
    heldout = HeldoutLoss(cfg.eval.interval, t.steps, [], micro, amp, device.type, world)
    guards = build_guards(
        cfg.guards,
        strategy=cfg.parallel.strategy,
        run_dir=run_dir,
        model=model,
        device=device,
        amp=amp,
        objective=objective,
        world=world,
        log=log,
        checkpoint_due=checkpointer.due,
    )
    heartbeat = None
    if cfg.guards.watchdog:  # the watchdog watches from here on

        def long_step(step: int) -> bool:  # a checkpoint or a held-out loss after it
            return checkpointer.due(step) or (not rl and heldout.on_schedule(step))

        heartbeat = Heartbeat(run_dir, world.rank, cfg.guards, long_step)
        hooks.add_heartbeat(heartbeat)
    replicas = world.distributed and cfg.parallel.strategy == "ddp"
    install_chaos(cfg.chaos, state, hooks, t.steps, replicas)
    checkpointer.cleanup()
    state.step = checkpointer.load_latest() or 0
    if state.step > t.steps:
        raise ConfigError(
            f"train.steps = {t.steps} is below the step of the checkpoint to resume, {state.step}; "
            "raise train.steps to continue"
        )
    if world.is_main:  # written once the config is known to fit the checkpoint
        write_file(run_dir, "config.toml", identity.config_toml)  # following no link (runfiles)
    if state.step:
        log.print(f"resumed from step {state.step}")
    if generation and failed_at is not None:  # every rank records its own (the ledger counts rank 0's)
        fields = {"rank": world.rank, "generation": generation, "step": state.step}
        append_event(run_dir, "restart_in_process", **fields, duration_s=time.monotonic() - failed_at)
    heldout.batches = heldout_batches(cfg, tokenizer, world)
    first = generation == 0 and not int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    first = first and not int(os.environ.get(POOL_ATTEMPT, "0"))  # a pool's first start waits for the others
    pools = NoPools() if pool is None else PoolSync(cfg, state, pool, heartbeat, first)  # after the resume: its step
    hooks.add_closer(pools.close)
    return Trainer(
        state=state,
        hooks=hooks,
        objective=objective,
        guards=guards,
        heartbeat=heartbeat,
        heldout=heldout,
        meter=StepMeter(core, device, world, amp),
        preemption=preemption,
        references=ReferenceResets(cfg.grpo.ref_reset_interval, ref, model, world, log) if rl else None,
        pools=pools,
        schedule=t,
        boundary=boundary,
        micro=micro,
        amp=amp,
    )


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


def _log_start(cfg: Config, state: TrainState, generation: int = 0) -> None:
    """The run_start event (and a restart's, a crash's and a fresh MTP module's), and the
    removal of a final save that a crash cut short."""
    log, world, device, run_dir = state.log, state.world, state.device, state.run_dir
    args = unwrap(state.model).args
    total, active = count_parameters(args, include_mtp=True)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    _note_crash(run_dir, log, world)
    log.event(
        "run_start",
        config_digest=cfg.digest(),
        device=device.type,
        device_name=device.name(),
        world_size=world.world_size,
        strategy=cfg.parallel.strategy if world.distributed else "none",
        dp_replicate=world.layout.dp_replicate,
        dp_shard=world.layout.dp_shard,
        ep=world.layout.ep,
        activation_checkpoint=cfg.train.activation_checkpoint,
        compile=cfg.train.compile,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        python=platform.python_version(),
        parameters=total,
        activated=active,
        **precision(cfg, device, world),
        **build_memory(device, world),
        restart=restart,
        generation=generation,
        pid=os.getpid(),
    )
    if restart:
        log.event("restart", count=restart)
    if getattr(unwrap(state.model), "mtp_initialized", False):
        log.event("mtp_initialized", init_from=cfg.model.init_from, layers=args.num_nextn_predict_layers)
        log.print(
            f"[yellow]{escape(cfg.model.init_from)} has no MTP weights: the MTP module starts freshly "
            "initialised[/yellow]"
        )
    if world.is_main:
        for leftover in remove_save_leftovers(run_dir / "final"):  # a final save cut short by a crash
            log.event("final_save_cleanup", path=str(leftover))
    where = ",".join(cfg.data.tasks) if cfg.data.source == "reasoning_gym" else cfg.data.path
    log.print(
        f"anychip train: {cfg.model.preset} ({total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active) on "
        f"{world.world_size} x {device.type} ({device.name()}{_layout_words(cfg, world)}), "
        f"{cfg.train.mode} on {cfg.data.source}:{where}"
        f" -> {escape(str(run_dir))}"
    )


def precision(cfg: Config, device: Device, world: World) -> dict[str, str]:
    """The dtypes in force: of the matrix multiplications (autocast), of the parameters they
    read (FSDP2 gathers them in the compute dtype; elsewhere autocast casts float32 weights),
    of the master weights and optimizer state, and of the gradients' reduction."""
    amp = autocast_dtype(cfg.train.dtype, device)
    compute = str(amp or torch.float32).removeprefix("torch.")
    sharded = world.distributed and cfg.parallel.strategy == "fsdp"
    return {
        "compute_dtype": compute,
        "param_dtype": compute if sharded else "float32",
        "master_dtype": "float32",
        "reduce_dtype": cfg.parallel.reduce_dtype if sharded else "float32",
    }


def build_memory(device: Device, world: World) -> dict[str, list[int]]:
    """Each rank's peak memory so far (the build's), by rank: the device's peak allocation (the
    process's peak resident set on CPU) and the host's peak resident set."""
    import resource

    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    peak = device.memory_stats()["peak_allocated"]
    return {
        "build_peak_bytes": [int(b) for b in all_gather_floats(float(peak), world)],
        "build_host_peak_rss_bytes": [int(b) for b in all_gather_floats(float(host), world)],
    }


def _layout_words(cfg: Config, world: World) -> str:
    if not world.distributed:
        return ""
    if cfg.parallel.strategy == "ddp":
        return "; ddp"
    return f"; fsdp {world.layout}"


def _note_crash(run_dir: Path, log: RunLog, world: World) -> None:
    """An earlier start of this run that never logged run_end died: record it."""
    if not world.is_main:
        return
    events = keep_fitting(read_jsonl(run_dir / "events.jsonl"), EVENT)  # before this start logs anything
    starts = [i for i, e in enumerate(events) if e["event"] == "run_start"]
    if starts and not any(e["event"] == "run_end" for e in events[starts[-1] :]):
        metrics = read_jsonl_tail(run_dir / "metrics.jsonl", schema=METRIC, enough=bool)  # its last record
        last_step = metrics[-1]["step"] if metrics else 0
        last_record = max(events[-1]["time"], metrics[-1]["time"] if metrics else 0)
        log.event("crash_detected", last_step=last_step, last_record=last_record)
