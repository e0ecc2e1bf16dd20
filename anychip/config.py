"""Run configuration: TOML plus ``--set section.key=value`` overrides, into one typed
dataclass per section (``[train]`` is TrainConfig, ...).

Each field declares everything about its key in one place: the type, the default, the
allowed values (``Literal[...]`` for choices, ``Annotated[..., Range(...)]`` for numbers)
and its documentation, the string literal under it (read by ``field_docs``)::

    steps: Annotated[int, Range(gt=0)] = 600
    \"\"\"Optimizer steps of the run.\"\"\"

One parser, ``load_config``, walks these dataclasses: every key is checked before any
work starts, and an unknown key, a wrong type or an impossible value is a ConfigError
naming the file (or ``--set``), the key, the value and what was expected. ``validate``
checks what one field cannot say alone (batch splits, the model ``init_from`` names, the
files training reads). The shipped ``configs/default.toml`` is generated from the same
declarations: ``python -m anychip.config > anychip/configs/default.toml``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import math
import os
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import tomli_w

from .data.loader import MODES as TOKEN_MODES
from .device import NAMES as DEVICE_NAMES
from .errors import ConfigError
from .models.deepseek.args import SHAPE_FREE, ModelArgs
from .models.deepseek.parallelize import ACTIVATION_CHECKPOINT
from .models.deepseek.presets import PRESETS
from .rl.losses import LEVELS, LOSS_TYPES, SCALES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Range:
    """The allowed interval of a number field: ``x > gt``, ``x >= ge``, ``x < lt``, ``x <= le``
    (each bound optional), declared as ``Annotated[float, Range(gt=0, lt=1)]``."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __contains__(self, x) -> bool:
        return (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )

    def __str__(self) -> str:
        """What an error message expects: "> 0", ">= 0", "in (0, 1]", ..."""
        low = [(op, v) for op, v in (("(", self.gt), ("[", self.ge)) if v is not None]
        high = [(op, v) for op, v in ((")", self.lt), ("]", self.le)) if v is not None]
        if len(low) == len(high) == 1:
            return f"in {low[0][0]}{_number(low[0][1])}, {_number(high[0][1])}{high[0][0]}"
        words = {"(": ">", "[": ">=", ")": "<", "]": "<="}
        return " and ".join(f"{words[op]} {_number(v)}" for op, v in low + high)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# the fault kinds of chaos mode: anychip/chaos.py describes them and takes them from here
FAULT_KINDS = (
    "kill",
    "exception",
    "hang",
    "nan",
    "bitflip",
    "slow",
    "corrupt_checkpoint",
    "checkpoint_write",
    "bad_batch",
    "sdc",
    "pool_loss",
)
PRESET_NAMES = tuple(PRESETS)
TRAIN_MODES = (*TOKEN_MODES, "grpo")  # grpo: batches of sampled completions (anychip/rl) instead of tokens


def split_fault(spec: str) -> tuple[str, int, int]:
    """(kind, step, rank) of a fault ``kind@step`` or ``kind@step:rank`` (rank 0 when not
    given); raises ValueError naming what is wrong."""
    kind, sep, rest = spec.strip().partition("@")
    if not sep or kind not in FAULT_KINDS:
        raise ValueError(f"{spec!r}: expected kind@step[:rank] with kind one of {', '.join(FAULT_KINDS)}")
    step, _, rank = rest.partition(":")
    if not step.isdigit() or int(step) < 1 or (rank and not rank.isdigit()):
        raise ValueError(f"{spec!r}: step must be an integer >= 1 and rank an integer >= 0")
    return kind, int(step), int(rank or 0)


# -- the sections ---------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The model: a preset of shapes, which any field of ModelArgs (anychip/models/deepseek/args.py)
    given here overrides; optionally the weights of another model to start from."""

    preset: Literal[PRESET_NAMES] = "tiny"
    """Named shapes (anychip/models/deepseek/presets.py): debug and tiny for tests and the CPU demo,
    v2-lite and v3 the published ones."""
    init_from: str = ""
    """The weights to start from: "" = random init; or a Hugging Face directory ("hf:DIR" or DIR), an anychip
    run (its final/ model, else its newest checkpoint) or a checkpoint directory, whose shapes the model takes."""
    overrides: dict = field(default_factory=dict, metadata={"key": False})
    """The ModelArgs fields given in [model] besides preset and init_from (not a key itself: the keys
    are the ModelArgs field names)."""


@dataclass
class TrainConfig:
    """The optimisation: AdamW, linear warm-up then cosine decay of the learning rate."""

    steps: Annotated[int, Range(gt=0)] = 600
    """Optimizer steps of the run."""
    seed: int = 0
    """Seed of the model initialisation, the data split and the data order."""
    mode: Literal[TRAIN_MODES] = "sft"
    """pretrain: loss on every token | sft: loss on completion tokens only | grpo: reinforcement learning
    from rewards, see [grpo] (`anychip grpo`)."""
    global_batch: Annotated[int, Range(gt=0)] = 16
    """Sequences per optimizer step, all ranks together."""
    micro_batch: Annotated[int, Range(ge=0)] = 0
    """Sequences per forward pass and rank; 0 = global_batch / world size (no gradient accumulation)."""
    seq_len: Annotated[int, Range(gt=0)] = 128
    """Tokens per training sequence."""
    lr: Annotated[float, Range(gt=0, lt=1)] = 3e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """The cosine decays the learning rate to lr x min_lr_ratio at the last step."""
    warmup_steps: Annotated[int, Range(ge=0)] = 30
    """Steps of linear learning-rate warm-up."""
    weight_decay: Annotated[float, Range(ge=0)] = 0.1
    """AdamW decoupled weight decay (of matrices only)."""
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    """AdamW decay rate of the gradient mean."""
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95
    """AdamW decay rate of the squared-gradient mean."""
    grad_clip: Annotated[float, Range(ge=0)] = 1.0
    """Max global gradient norm; 0 = off."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Autocast dtype; auto = the device's low-precision dtype on accelerators, float32 on CPU."""
    deterministic: bool = False
    """Deterministic kernels for the whole run (torch.use_deterministic_algorithms; on CUDA with cuBLAS's
    workspace pinned), so that a resumed run ends bit-identical to an uninterrupted one on accelerators
    too (CPU kernels are deterministic already). An op without a deterministic kernel then stops the run
    with an error. Costs speed: scatters and index_add_ (the MoE combine) sort instead of using atomics,
    some attention and GEMM algorithms are ruled out, and new tensors are filled before use."""
    compile: bool = False
    """Compile each transformer block (torch.compile, in place, after activation checkpointing and
    before FSDP/DDP; the compiled backward does the recomputation); the first steps are slower
    while it compiles."""
    activation_checkpoint: Literal[ACTIVATION_CHECKPOINT] = "none"
    """Recompute activations in the backward pass: none | block (keep each block's input only) |
    selective (keep matmul outputs, recompute the cheap ops); the losses do not change."""
    log_interval: Annotated[int, Range(gt=0)] = 10
    """Steps between metric log lines."""


@dataclass
class DataConfig:
    """The training data (reasoning-gym tasks or a corpus file) and the tokenizer."""

    source: Literal["reasoning_gym", "jsonl", "text"] = "reasoning_gym"
    """reasoning_gym: problems generated from data.tasks | jsonl: the records of data.path | text: the
    plain text of data.path."""
    tasks: list[str] = field(default_factory=lambda: ["basic_arithmetic"])
    """reasoning-gym task names, e.g. basic_arithmetic, chain_sum, countdown."""
    task_options: dict = field(default_factory=dict)
    """Reasoning-gym dataset settings, a table per task of data.tasks, e.g. [data.task_options.chain_sum]."""
    reasoning: Literal["columns", "expression"] = "columns"
    """The <think> text of rendered tasks: columns = column arithmetic for two-term sums and differences
    (digit by digit with carries), else the expression | expression = "a + b = c"."""
    path: str = ""
    """The corpus file of data.source = "jsonl" or "text"."""
    text_field: str = "text"
    """The field of a jsonl record that holds its text (without prompt_field and completion_field)."""
    prompt_field: str = ""
    """With completion_field: the field of a jsonl record that holds the prompt ("" = none)."""
    completion_field: str = ""
    """With prompt_field: the field of a jsonl record that holds the completion ("" = none)."""
    tokenizer: str = "byte"
    """byte, or the path of a tokenizer.json."""
    heldout_size: Annotated[int, Range(ge=0)] = 200
    """Reasoning-gym problems held out of training, for evaluation."""


@dataclass
class DeviceConfig:
    """The device type (anychip/device)."""

    type: Literal[DEVICE_NAMES] = "auto"
    """auto = $ANYCHIP_DEVICE when set, else the first available of cuda, npu, xpu, mps, cpu."""


@dataclass
class ParallelConfig:
    """Worker processes and their restarts (anychip's agent; torch's under torchrun)."""

    nproc: Annotated[int, Range(gt=0)] = 1
    """Local worker processes started by `anychip train`."""
    max_restarts: Annotated[int, Range(ge=0)] = 3
    """Failed workers are restarted this many times and resume from the newest snapshot or checkpoint."""
    spare_workers: Annotated[int, Range(ge=0)] = 1
    """Warm spares kept by `anychip train`'s agent: interpreters with torch and anychip imported, idle at
    the lowest CPU priority, each ready to take the rank of a dead worker (0: a new interpreter then)."""
    strategy: Literal["fsdp", "ddp"] = "fsdp"
    """fsdp: FSDP2 fully_shard | ddp: replicas; used when the world size is > 1."""
    dp_replicate: Annotated[int, Range(gt=0)] = 1
    """HSDP: groups holding replicas of the model; FSDP2 shards within each group (fsdp only)."""
    dp_shard: Annotated[int, Range(ge=0)] = 0
    """Ranks each replica is sharded over; 0 = world size / dp_replicate."""
    ep: Annotated[int, Range(gt=0)] = 1
    """Expert parallelism: routed experts split over this many ranks of the shard dimension, tokens sent
    to them by all-to-all; divides dp_shard and the routed experts (fsdp only)."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """fsdp: dtype of the gradients' reduce-scatter (and HSDP's all-reduce). Under train.dtype =
    bfloat16/float16 FSDP2 all-gathers the parameters in that dtype for compute and keeps float32
    master weights and optimizer state; the gradients are reduced in float32 unless this says
    bfloat16 (half the bytes on the wire, the sum rounded to 8 bits of mantissa)."""
    restart_in_process: bool = True
    """After an exception in a worker whose process is still healthy, every rank tears down its process
    group and re-enters training in the same process (a new group, state from the newest snapshot),
    up to max_restarts times per process; a dead or stuck worker is started again alone under
    `anychip train`'s agent (its peers restart in place), every worker of its node under torchrun."""
    preempt_grace_s: Annotated[float, Range(gt=0)] = 30.0
    """After SIGTERM/SIGINT every rank checkpoints at the next step boundary and exits 0; SIGKILL after
    this many seconds."""


@dataclass
class CheckpointConfig:
    """Checkpoints: DCP, atomic, verified by a manifest."""

    interval: Annotated[int, Range(ge=0)] = 100
    """Steps between checkpoints; 0 = none."""
    keep: Annotated[int, Range(gt=0)] = 2
    """Newest checkpoints kept."""
    keep_every: Annotated[int, Range(ge=0)] = 0
    """Also keep every checkpoint whose step is a multiple of this; 0 = none."""
    async_save: bool = True
    """Stage and write in the background; false: the loop waits for the write."""
    snapshot_interval: Annotated[int, Range(ge=0)] = 1
    """Steps between snapshots in shared memory (two kept per rank, anychip/snapshot.py): a restart or
    a rollback resumes from the newest one every rank holds, else from the disk checkpoint; 0 = none."""
    snapshot_async: bool = True
    """Copy snapshots in a background thread while the next step's forward and backward run (the loop
    waits for it before the optimizer changes the weights); false: in the loop."""


@dataclass
class GuardsConfig:
    """Reliability guards around each step (anychip/guards); each can be switched off."""

    nonfinite: bool = True
    """NaN/Inf loss or gradients: skip the update, retry the batch once, then skip the batch."""
    nonfinite_max: Annotated[int, Range(gt=0)] = 3
    """Non-finite steps in a row before rolling back to the last checkpoint."""
    spike: bool = True
    """Loss / gradient-norm spikes: roll back and skip the data window that led there."""
    spike_window: Annotated[int, Range(gt=0)] = 50
    """Steps of history for the median and the MAD."""
    spike_min_history: Annotated[int, Range(ge=0)] = 20
    """No spike is called before this many steps of history."""
    spike_threshold: Annotated[float, Range(gt=0)] = 8.0
    """Robust z-score of the loss, (x - median) / (1.4826 MAD), that makes a spike."""
    spike_min_rise: Annotated[float, Range(ge=0)] = 0.25
    """... when the loss also exceeds the median by this fraction."""
    spike_grad_threshold: Annotated[float, Range(ge=0)] = 0.0
    """The same for the gradient norm; 0 = off (loss only): with clipping, healthy runs show
    gradient-norm excursions of 20x the median."""
    spike_grad_min_rise: Annotated[float, Range(ge=0)] = 2.0
    """... when the gradient norm also exceeds the median by this fraction."""
    max_rollbacks: Annotated[int, Range(gt=0)] = 3
    """Rollbacks for the same fault without getting past it before the run stops with an error."""
    watchdog: bool = True
    """Hang watchdog: a process beside each worker kills it when it stops making progress."""
    watchdog_factor: Annotated[float, Range(gt=0)] = 2.0
    """Hang deadline = factor x median step time + grace."""
    watchdog_grace_s: Annotated[float, Range(ge=0)] = 5.0
    """Seconds added to the hang deadline."""
    watchdog_startup_s: Annotated[float, Range(gt=0)] = 600.0
    """Deadline outside steps: start-up, checkpoint steps, rollbacks, final evaluation."""
    collective_timeout_s: Annotated[float, Range(gt=0)] = 600.0
    """Process-group timeout of every collective, in seconds."""
    straggler_interval: Annotated[int, Range(ge=0)] = 50
    """Steps between straggler verdicts (every step is measured); 0 = off."""
    straggler_factor: Annotated[float, Range(gt=1)] = 1.3
    """A rank slower than the median rank by this factor is flagged."""
    replica_check_interval: Annotated[int, Range(ge=0)] = 50
    """Steps between parameter fingerprint comparisons of DDP replicas; 0 = off."""
    audit_interval: Annotated[int, Range(ge=0)] = 100
    """Steps between recompute audits (one micro-batch computed twice); 0 = off."""
    audit_rows: Annotated[int, Range(gt=0)] = 1
    """Sequences of the micro-batch recomputed by an audit."""
    audit_tolerance: float = -1.0
    """Relative tolerance of an audit; 0 = bit-equal; < 0 = auto (bit-equal on CPU, 1e-5 elsewhere)."""
    audit_max_failures: Annotated[int, Range(gt=0)] = 2
    """Failed audits of one rank before it is reported as faulty hardware."""


@dataclass
class ChaosConfig:
    """Fault injection (anychip/chaos.py): proves the guards and the recovery work;
    `anychip train --chaos nan@12,kill@30:1`."""

    at: list[str] = field(default_factory=list)
    """Faults at given steps, "kind@step" or "kind@step:rank" (rank 0 when not given), e.g. ["nan@12",
    "kill@30:1"]; the kinds are those chaos.kinds allows; pool_loss@step:pool kills every process of a
    pool."""
    every: Annotated[int, Range(ge=0)] = 0
    """A random fault about every this many steps (seeded); 0 = none."""
    kinds: list[Literal[FAULT_KINDS]] = field(
        default_factory=lambda: [k for k in FAULT_KINDS if k not in ("bad_batch", "sdc", "pool_loss")]
    )
    """What random faults draw from (bad_batch, sdc and pool_loss strike only where chaos.at names them)."""
    seed: int = 0
    """Seed of the random faults."""
    slow_s: Annotated[float, Range(ge=0)] = 0.5
    """Delay per step of a slowed rank, in seconds."""
    slow_steps: Annotated[int, Range(ge=0)] = 20
    """Steps a slowed rank stays slow."""
    hang: Literal["native", "stop"] = "native"
    """native: a native call that holds the GIL | stop: SIGSTOP."""


@dataclass
class GRPOConfig:
    """Reinforcement learning with verifiable rewards (train.mode = "grpo", anychip/rl): one step
    = one optimizer update."""

    prompts_per_step: Annotated[int, Range(gt=0)] = 16
    """Prompts per rollout batch, all ranks together (each rank samples whole groups)."""
    group_size: Annotated[int, Range(gt=0)] = 8
    """Completions sampled per prompt (G)."""
    max_new_tokens: Annotated[int, Range(gt=0)] = 96
    """Completion length cap (L_max); sampling stops earlier at eos or </answer>."""
    temperature: Annotated[float, Range(gt=0)] = 1.0
    """Sampling temperature of the rollouts."""
    top_k: Annotated[int, Range(ge=0)] = 0
    """Sample from the k most likely tokens; 0 = off."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus sampling: the smallest set of tokens with this probability mass; 1 = off."""
    loss: Literal[LOSS_TYPES] = "grpo"
    """grpo: per-sequence token mean (DeepSeekMath/R1) | bnpo: token mean of the batch | dapo: token mean
    of the global batch | dr_grpo: token sum / (sequences x max_new_tokens)."""
    importance: Literal[LEVELS] = "token"
    """token: per-token ratio | sequence: GSPO's sequence-level ratio."""
    advantage_scale: Literal[SCALES] = "group"
    """(reward - group mean) / std of: group | batch | none (Dr. GRPO)."""
    eps_low: Annotated[float, Range(ge=0)] = 0.2
    """Ratio clip 1 - eps_low."""
    eps_high: Annotated[float, Range(ge=0)] = 0.2
    """Ratio clip 1 + eps_high (DAPO's clip-higher: 0.28)."""
    beta: Annotated[float, Range(ge=0)] = 0.04
    """Weight of the k3 KL to the frozen reference policy; 0 = no reference model."""
    ref_reset_interval: Annotated[int, Range(ge=0)] = 0
    """Steps between resets of the reference to the current policy; 0 = never."""
    iterations: Annotated[int, Range(gt=0)] = 1
    """Optimisation passes over each rollout batch (mu); > 1 keeps the old policy's log-probs."""
    minibatches: Annotated[int, Range(gt=0)] = 1
    """Optimizer updates per pass; steps per rollout batch = iterations x minibatches."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and sample more prompts."""
    max_sampling_rounds: Annotated[int, Range(gt=0)] = 3
    """Sampling rounds per rollout batch with dynamic sampling."""
    overlong_filter: bool = False
    """DAPO: completions cut at max_new_tokens carry no loss."""
    overlong_buffer: Annotated[int, Range(gt=0)] = 16
    """L_cache of the "overlong" reward (DAPO's soft overlong punishment)."""
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    """Weight per reward: accuracy (the task's verifier), format (<think>..</think><answer>..</answer>),
    overlong, or a function "module:function"."""
    seed: int = 0
    """Seed of the rollout sampler (the data split and prompt order follow train.seed)."""


@dataclass
class PoolsConfig:
    """Pools: one run over several fleets (each an ordinary job with its own processes, device type and
    agent), kept on one model by torchft's Manager and lighthouse; a pool that dies leaves the others
    training, and takes the weights from a live pool when it comes back (anychip/pools)."""

    count: Annotated[int, Range(gt=0)] = 1
    """Pools of the run; 1 = no pools. train.global_batch is the batch of all pools together."""
    sync: Literal["step", "diloco"] = "step"
    """step: gradients averaged over the pools every step (fast links) | diloco: each pool takes
    pools.sync_every steps alone, then the pools average their weight changes (slow links)."""
    sync_every: Annotated[int, Range(gt=0)] = 8
    """DiLoCo: inner steps H between two exchanges between the pools."""
    outer_lr: Annotated[float, Range(gt=0)] = 0.7
    """DiLoCo: learning rate of the outer optimizer (SGD with Nesterov momentum)."""
    outer_momentum: Annotated[float, Range(ge=0, lt=1)] = 0.5
    """DiLoCo: momentum of the outer optimizer. The DiLoCo paper's 0.9 (with H = 500) overshoots at small H:
    on `tiny` with H = 8 its held-out loss was 40% above per-step sync's after the same tokens, 0.5's 3-4%."""
    timeout_s: Annotated[float, Range(gt=0)] = 5.0
    """A pool silent this long is left out of the quorum: the others go on without it after at most about
    this long (the lighthouse's heartbeat timeout; the cross-pool collective's is 2 x this). The
    lighthouse is $TORCHFT_LIGHTHOUSE (`anychip train --pool I --lighthouse URL`), or the one that
    `anychip train --pools K` starts."""
    max_restarts: Annotated[int, Range(ge=0)] = 3
    """`anychip train --pools K`: a pool whose job ended in failure is started again this many times."""


@dataclass
class EvalConfig:
    """Evaluation: held-out loss during training, held-out problems scored at the end."""

    n: Annotated[int, Range(ge=0)] = 200
    """Held-out problems scored after training."""
    max_new_tokens: Annotated[int, Range(gt=0)] = 96
    """Answer length cap of the scored problems."""
    batch_size: Annotated[int, Range(gt=0)] = 50
    """Problems generated at once."""
    interval: Annotated[int, Range(ge=0)] = 100
    """Held-out loss (metric eval_loss) every this many steps and at the last one; 0 = none."""
    loss_batches: Annotated[int, Range(gt=0)] = 4
    """... over this many fixed held-out batches of train.global_batch sequences (reasoning_gym data; not
    in GRPO runs)."""


@dataclass
class LogConfig:
    """What the run writes besides metrics.jsonl and events.jsonl."""

    tensorboard: bool = True
    """TensorBoard event files in the run directory."""
    progress: bool = True
    """A rich progress bar on a terminal."""


@dataclass
class Config:
    """The whole run configuration: one section per component, named as in the TOML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def model_args(self, vocab_size: int | None = None) -> ModelArgs:
        """ModelArgs of the preset with the overrides; vocab grows to fit the tokenizer."""
        args = PRESETS[self.model.preset].replace(**self.model.overrides)
        if vocab_size is not None and args.vocab_size < vocab_size:
            if "vocab_size" in self.model.overrides:
                raise ConfigError(
                    f"model.vocab_size = {args.vocab_size} is smaller than the tokenizer's {vocab_size} tokens"
                )
            args = args.replace(vocab_size=vocab_size)
        return args

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            section = dataclasses.asdict(getattr(self, f.name))
            if f.name == "model":
                section.update(section.pop("overrides"))
            out[f.name] = section
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))

    def digest(self) -> str:
        return hashlib.sha256(self.to_toml().encode()).hexdigest()[:12]


def _drop_none(d: dict) -> dict:
    """TOML has no null: None is written as "none", which every optional key reads back."""
    return {k: _drop_none(v) if isinstance(v, dict) else ("none" if v is None else v) for k, v in d.items()}


# What the shipped default.toml sets beyond the dataclass defaults. The model terms are the tiny
# preset's own values, written out so that every run's config.toml (and digest) names them.
MODEL_DEFAULTS: dict[str, tuple[object, str]] = {
    "num_nextn_predict_layers": (1, "Multi-token prediction modules (D); 0 = none."),
    "mtp_loss_weight": (0.3, "lambda: weight of the multi-token prediction loss."),
    "bias_update_speed": (0.001, "gamma of the auxiliary-loss-free balancing."),
}
DEMO_TASK_OPTIONS = {"basic_arithmetic": {"operators": ["+", "-"], "allow_negation": False, "allow_parentheses": False}}
SHIPPED_VALUES: dict[tuple[str, str], tuple[object, str]] = {
    ("data", "task_options"): (DEMO_TASK_OPTIONS, "The demo: two-term sums and differences of 1-2 digit numbers."),
}


# -- the declarations, read back ------------------------------------------------------------


@functools.cache
def sections() -> dict[str, type]:
    """Section name -> its dataclass, in file order."""
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


@functools.cache
def keys(cls: type) -> dict[str, object]:
    """The config keys of a section dataclass -> their type hints, with the Literal and
    Annotated declarations (``include_extras``)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("key", True)}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal right under the field in the class body (as tyro
    reads them), with whitespace runs joined to single spaces."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def section_doc(cls: type) -> str:
    """The docstring of a section dataclass, on one line."""
    return " ".join((inspect.getdoc(cls) or "").split())


def _unwrap(hint) -> tuple[object, list[Range]]:
    """(the type without Annotated, the Ranges declared on it)."""
    if typing.get_origin(hint) is Annotated:
        return typing.get_args(hint)[0], [m for m in hint.__metadata__ if isinstance(m, Range)]
    return hint, []


def allowed(hint) -> str:
    """The allowed values a field declares, as error messages say them ("" when any value of its type is)."""
    hint, ranges = _unwrap(hint)
    if ranges:
        return " and ".join(str(r) for r in ranges)
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(typing.get_args(hint))
    if typing.get_origin(hint) is list and typing.get_origin(typing.get_args(hint)[0]) is Literal:
        return "values among " + ", ".join(typing.get_args(typing.get_args(hint)[0]))
    return ""


def _is_allowed(value, hint) -> bool:
    hint, ranges = _unwrap(hint)
    if typing.get_origin(hint) is Literal:
        return value in typing.get_args(hint)
    if typing.get_origin(hint) is list and typing.get_origin(typing.get_args(hint)[0]) is Literal:
        return all(v in typing.get_args(typing.get_args(hint)[0]) for v in value)
    return all(value in r for r in ranges)


# -- loading --------------------------------------------------------------------------------

DEFAULT_CONFIG = "default.toml"
GRPO_CONFIG = "grpo.toml"  # the embedded default of `anychip grpo`


def default_config_text(name: str = DEFAULT_CONFIG) -> str:
    return resources.files("anychip.configs").joinpath(name).read_text()


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), embedded: str = DEFAULT_CONFIG, check_inputs: bool = True
) -> Config:
    """The resolved Config: defaults < the TOML file (the embedded ``embedded`` when None)
    < ``overrides`` ("section.key=value", value in TOML syntax, bare words as strings).
    Raises ConfigError naming the file, key, value and expectation; FileNotFoundError
    for a missing file.

    ``check_inputs=False`` reads a run's config without looking at what training would
    need besides it (the corpus, the tokenizer file, ``model.init_from``) and without
    importing reward modules: what ``export``, ``eval``, ``status`` and ``report`` use, so
    that a copied run is readable and a run directory from elsewhere runs no code."""
    if path is None:
        source, text = f"<embedded {embedded}>", default_config_text(embedded)
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        source, text = str(p), p.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML ({e})") from None
    cfg = Config()
    _apply(cfg, raw, source)
    for item in overrides:
        section, key, value = _parse_override(item)
        _apply(cfg, {section: {key: value}}, f"--set {item}")
    validate(cfg, source + (f" with --set {' '.join(overrides)}" if overrides else ""), check_inputs)
    return cfg


def _parse_override(item: str) -> tuple[str, str, object]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word: a string
    return section, key, value


def _apply(cfg: Config, raw: dict, source: str) -> None:
    """Set the values of ``raw`` ({section: {key: value}}) on ``cfg``, each checked against
    its field's type (the allowed values are checked by ``validate``, once all are set)."""
    known_sections = sections()
    for name, values in raw.items():
        if name not in known_sections:
            raise ConfigError(f"{source}: unknown section [{name}]; known: {', '.join(known_sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys, got {values!r}")
        section = getattr(cfg, name)
        hints = keys(type(section))
        for key, value in values.items():
            where = f"{source}: {name}.{key} = {value!r}"
            if name == "model" and key not in hints:
                section.overrides[key] = _model_value(key, value, where)
                continue
            if key not in hints:
                raise ConfigError(f"{source}: unknown key {name}.{key}; known keys of [{name}]: {', '.join(hints)}")
            setattr(section, key, _coerce(value, hints[key], where))


def _model_value(key: str, value, where: str):
    fields = {f.name: f for f in dataclasses.fields(ModelArgs) if f.name != "hf_extra"}
    if key not in fields:
        known = ", ".join([*keys(ModelConfig), *fields])
        raise ConfigError(f"{where}: unknown key; known keys of [model]: {known}")
    hint = typing.get_type_hints(ModelArgs)[key]
    if key == "rope_scaling":
        raise ConfigError(f"{where}: rope_scaling cannot be set from a config file; choose a preset")
    return _coerce(value, hint, where)


# type -> (accepted Python types, what the error says); bool is never an int here
_SCALARS = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: (str, "a string"),
    dict: (dict, "a table"),
}


def _coerce(value, hint, where: str):
    """``value`` as the type ``hint`` declares (an int read for a float becomes a float), or a
    ConfigError; a Literal is checked for its type here, for its values by ``validate``."""
    hint, _ = _unwrap(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value.lower() == "none" and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
    if origin is Literal:
        hint = type(typing.get_args(hint)[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings")
        return value
    if hint in _SCALARS:
        accepted, expected = _SCALARS[hint]
        if isinstance(value, bool) is not (hint is bool) or not isinstance(value, accepted):
            raise ConfigError(f"{where}: expected {expected}")
        if hint is float and not math.isfinite(value):  # NaN passes every range check
            raise ConfigError(f"{where}: expected a finite number")
        if hint is dict:  # e.g. reward weights, task options
            bad = [(k, v) for k, v in _leaves(value) if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise ConfigError(f"{where}: {bad[0][0]} = {bad[0][1]!r}: expected a finite number")
        return float(value) if hint is float else value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number")
    return value


def _leaves(table: dict, prefix: str = ""):
    for k, v in table.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


# -- checks across fields -------------------------------------------------------------------


def _validate_grpo(cfg: Config, bad, check_inputs: bool) -> None:
    g, nproc = cfg.grpo, cfg.parallel.nproc
    if g.prompts_per_step % nproc:
        raise bad("grpo", "prompts_per_step", f"a multiple of parallel.nproc = {nproc} (groups stay on one rank)")
    local = g.prompts_per_step // nproc
    if local % g.minibatches:
        raise bad("grpo", "minibatches", f"a divisor of the {local} prompts per process and rollout")
    rows = local // g.minibatches * g.group_size
    if cfg.train.micro_batch and rows % cfg.train.micro_batch:
        raise bad("train", "micro_batch", f"a divisor of the {rows} sequences per process and update")
    per = g.iterations * g.minibatches
    if cfg.train.steps % per:
        raise bad("train", "steps", f"a multiple of grpo.iterations x grpo.minibatches = {per} (whole rollouts)")
    if cfg.checkpoint.interval % per:
        raise bad("checkpoint", "interval", f"a multiple of grpo.iterations x grpo.minibatches = {per}")
    if cfg.grpo.ref_reset_interval % per:
        raise bad("grpo", "ref_reset_interval", f"a multiple of grpo.iterations x grpo.minibatches = {per}")
    if cfg.data.source != "reasoning_gym":
        raise bad("data", "source", '"reasoning_gym" for train.mode = "grpo" (rewards need a verifier)')
    if not cfg.model.init_from:
        raise bad("model", "init_from", 'a trained model for train.mode = "grpo" (anychip grpo --init RUN_DIR)')
    if g.group_size < 2 and g.advantage_scale == "group":
        raise bad("grpo", "group_size", ">= 2 (group-normalised advantages)")
    if not g.rewards or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in g.rewards.values()):
        raise bad("grpo", "rewards", "a table {name or module:function = weight}, e.g. {accuracy = 1.0, format = 0.1}")
    from .rl.rewards import BUILT_IN, load_function  # lazy: the reward modules are needed for GRPO only

    for name in g.rewards if check_inputs else ():  # importing a reward module runs its code
        if name not in BUILT_IN:
            try:
                load_function(name)
            except ValueError as e:
                raise bad("grpo", "rewards", f"importable reward functions ({e})") from None
    if "overlong" in g.rewards and not 0 < g.overlong_buffer <= g.max_new_tokens:
        raise bad("grpo", "overlong_buffer", f"<= grpo.max_new_tokens = {g.max_new_tokens}")


def _validate_pools(cfg: Config, bad) -> None:
    k, nproc = cfg.pools.count, cfg.parallel.nproc
    if cfg.train.global_batch % (k * nproc):
        raise bad("train", "global_batch", f"a multiple of pools.count x parallel.nproc = {k * nproc}")
    if cfg.train.mode == "grpo":
        raise bad("pools", "count", '1 with train.mode = "grpo" (pools train token batches only)')


def validate(cfg: Config, source: str = "config", check_inputs: bool = True) -> None:
    """Check that every value is among those its field allows, then what fields say
    together; with ``check_inputs`` also the files and modules training would read (see
    ``load_config``)."""

    def bad(section: str, key: str, expected: str) -> ConfigError:
        value = getattr(getattr(cfg, section), key)
        return ConfigError(f"{source}: {section}.{key} = {value!r} is invalid: expected {expected}")

    for name in sections():
        section = getattr(cfg, name)
        for key, hint in keys(type(section)).items():
            if not _is_allowed(getattr(section, key), hint):
                raise bad(name, key, allowed(hint))
    n_experts = None
    t = cfg.train
    if t.global_batch % cfg.parallel.nproc:
        raise bad("train", "global_batch", f"a multiple of parallel.nproc = {cfg.parallel.nproc}")
    if cfg.pools.count > 1:
        _validate_pools(cfg, bad)
    local = t.global_batch // (cfg.parallel.nproc * cfg.pools.count)
    if t.micro_batch and local % t.micro_batch:
        raise bad("train", "micro_batch", f"a divisor of the {local} sequences per process")
    if cfg.model.init_from and check_inputs:
        from .init_from import init_shape, resolve_init  # lazy: it loads torch.distributed.checkpoint

        try:
            kind, path = resolve_init(cfg.model.init_from)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{source}: model.init_from: {e}") from None
        shape = init_shape(kind, path)
        n_experts = shape.get("n_routed_experts")  # the shapes come from that model
        for key, value in cfg.model.overrides.items():  # the shapes come from that model
            if key not in SHAPE_FREE and key in shape and shape[key] != value:
                raise ConfigError(
                    f"{source}: model.{key} = {value!r} cannot be combined with model.init_from = "
                    f"{cfg.model.init_from!r}, whose {key} is {shape[key]!r}: a model started from another takes "
                    f"its shapes (only {', '.join(sorted(SHAPE_FREE - {'hf_extra'}))} may differ)"
                )
    if cfg.train.mode == "grpo":
        _validate_grpo(cfg, bad, check_inputs)
    try:
        args = cfg.model_args()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if check_inputs:  # the config of a run to be started here (not one read to export or init from)
        from .parallel import plan_layout  # lazy: it imports torch.distributed

        world_size = int(os.environ.get("WORLD_SIZE", cfg.parallel.nproc))  # a worker knows the real one
        try:
            plan_layout(world_size, cfg.parallel, n_experts or args.n_routed_experts)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if t.seq_len > args.max_position_embeddings:
        raise bad("train", "seq_len", f"<= model max_position_embeddings = {args.max_position_embeddings}")
    if cfg.data.source == "reasoning_gym":
        from reasoning_gym.factory import DATASETS  # lazy: reasoning-gym is a heavy import

        unknown = [t for t in cfg.data.tasks if t not in DATASETS]
        if not cfg.data.tasks or unknown:
            raise bad("data", "tasks", "reasoning-gym task names, e.g. basic_arithmetic, chain_sum, countdown")
        extra = [t for t in cfg.data.task_options if t not in cfg.data.tasks]
        if extra or not all(isinstance(v, dict) for v in cfg.data.task_options.values()):
            raise bad("data", "task_options", "a table per task of data.tasks, e.g. [data.task_options.chain_sum]")
    if check_inputs and cfg.data.source in ("jsonl", "text") and not Path(cfg.data.path).exists():
        raise bad("data", "path", f"an existing corpus file for data.source = {cfg.data.source!r}")
    for spec in cfg.chaos.at:
        try:
            split_fault(spec)
        except ValueError as e:
            raise ConfigError(f"{source}: chaos.at: {e}") from None
    if check_inputs and cfg.data.tokenizer != "byte" and not Path(cfg.data.tokenizer).exists():
        raise bad("data", "tokenizer", '"byte" or the path of an existing tokenizer.json')


# -- the shipped default.toml ---------------------------------------------------------------

_HEADER = """\
# The embedded default of `anychip train`: the tiny DeepSeek-style model learns
# arithmetic from reasoning-gym on the auto-detected device, in minutes on 2 CPU cores.
# Every key anychip knows is listed here with its default; see README "Configuration".
# Generated from anychip/config.py, where each key is declared with its type, default,
# allowed values (after each value) and doc: do not edit, regenerate with
#     python -m anychip.config > anychip/configs/default.toml"""


def default_toml() -> str:
    """The text of configs/default.toml: each section after its doc, each key after its doc
    and followed by its allowed values."""
    out = [_HEADER]
    for name, cls in sections().items():
        out += ["", *_comment(section_doc(cls)), f"[{name}]"]
        docs = field_docs(cls)
        for key, hint in keys(cls).items():
            value, note = SHIPPED_VALUES.get((name, key), (getattr(cls(), key), ""))
            out += [*_comment(docs[key]), *_comment(note), *_key_lines(key, value, allowed(hint))]
        if name == "model":
            out += _comment("Any other field of ModelArgs (anychip/models/deepseek/args.py) may be given here too.")
            for key, (value, doc) in MODEL_DEFAULTS.items():
                out += [*_comment(doc), *_key_lines(key, value, "")]
    return "\n".join(out) + "\n"


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, 98, break_on_hyphens=False)]


def _key_lines(key: str, value, allowed_values: str) -> list[str]:
    """``key = value``, with the allowed values after it, or above it when that line would be long."""
    line = f"{key} = {_toml_value(value)}"
    if not allowed_values:
        return [line]
    if len(line) + len(allowed_values) > 96:
        return [*_comment(f"Allowed: {allowed_values}."), line]
    return [f"{line}  # {allowed_values}"]


def _toml_value(value) -> str:
    """``value`` in TOML syntax on one line (tables inline)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


if __name__ == "__main__":
    print(default_toml(), end="")
