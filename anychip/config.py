"""Run configuration: TOML plus ``--set section.key=value`` overrides, into one typed
dataclass per component. Every key is checked before any work starts: an unknown
key, a wrong type or an impossible value is a ConfigError naming the file, the key,
the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import tomli_w

from .errors import ConfigError
from .models.deepseek.args import SHAPE_FREE, ModelArgs
from .models.deepseek.presets import PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    """``preset`` names the shapes; any ModelArgs field (e.g. ``num_hidden_layers``)
    given beside it overrides the preset."""

    preset: str = "tiny"
    init_from: str = ""  # "" = random init; a Hugging Face directory ("hf:DIR" or DIR), a run, or a checkpoint
    overrides: dict = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 600
    seed: int = 0
    mode: str = "sft"  # "pretrain": loss on every token; "sft": on completion tokens only
    global_batch: int = 16  # sequences per optimizer step, all ranks together
    micro_batch: int = 0  # sequences per forward pass and rank; 0 = global_batch / world (no accumulation)
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    dtype: str = "auto"  # autocast: auto | float32 | bfloat16 | float16
    log_interval: int = 10


@dataclass
class DataConfig:
    source: str = "reasoning_gym"  # reasoning_gym | jsonl | text
    tasks: list[str] = field(default_factory=lambda: ["basic_arithmetic"])
    task_options: dict = field(default_factory=dict)  # per task: reasoning-gym dataset settings
    reasoning: str = "columns"  # the <think> text: columns (column arithmetic where it applies) | expression
    path: str = ""  # jsonl / text corpus
    text_field: str = "text"
    prompt_field: str = ""
    completion_field: str = ""
    tokenizer: str = "byte"  # "byte" or a path to tokenizer.json
    heldout_size: int = 200


@dataclass
class DeviceConfig:
    type: str = "auto"  # auto | cpu | cuda | npu | xpu | mps (env ANYCHIP_DEVICE when auto)


@dataclass
class ParallelConfig:
    nproc: int = 1  # local worker processes started by `anychip train`
    max_restarts: int = 3  # the elastic agent restarts failed workers this many times; they resume
    strategy: str = "fsdp"  # fsdp (FSDP2 fully_shard) | ddp; used when world size > 1
    preempt_grace_s: float = 30.0  # after SIGTERM/SIGINT: time to finish the step and checkpoint, then SIGKILL


@dataclass
class CheckpointConfig:
    interval: int = 100  # steps between checkpoints (DCP, async); 0 = none
    keep: int = 2  # newest checkpoints kept
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    async_save: bool = True  # stage and write in the background; false: the loop waits for the write


@dataclass
class GuardsConfig:
    """Reliability guards around each step (anychip/guards); each can be switched off."""

    nonfinite: bool = True  # NaN/Inf loss or gradients: skip the update, retry the batch once, then skip it
    nonfinite_max: int = 3  # non-finite steps in a row before rolling back to the last checkpoint
    spike: bool = True  # loss / gradient-norm spikes: roll back and skip the data window that led there
    spike_window: int = 50  # steps of history for the median and MAD
    spike_min_history: int = 20  # no spike is called before this many steps of history
    spike_threshold: float = 8.0  # robust z-score (x - median) / (1.4826 MAD) of the loss that is a spike
    spike_min_rise: float = 0.25  # ... and the loss must also exceed the median by this fraction
    spike_grad_threshold: float = 0.0  # the same for the gradient norm; 0 = off (loss only)
    spike_grad_min_rise: float = 2.0
    max_rollbacks: int = 3  # rollbacks for the same fault in a row before the run stops with an error
    watchdog: bool = True  # hang watchdog: a process beside each worker that kills it when it stops beating
    watchdog_factor: float = 2.0  # hang timeout = factor * median step time + grace
    watchdog_grace_s: float = 5.0
    watchdog_startup_s: float = 600.0  # timeout outside steps: start-up, checkpoint load, final evaluation
    collective_timeout_s: float = 600.0  # process-group timeout of every collective
    straggler_interval: int = 50  # steps between straggler verdicts (every step is measured); 0 = off
    straggler_factor: float = 1.3  # a rank slower than the median step time by this factor is flagged
    replica_check_interval: int = 50  # steps between parameter fingerprint comparisons of replicas; 0 = off
    audit_interval: int = 100  # steps between recompute audits (one micro-batch computed twice); 0 = off
    audit_rows: int = 1  # sequences of the micro-batch recomputed by the audit
    audit_tolerance: float = -1.0  # relative tolerance; 0 = bit-equal; < 0 = auto (bit-equal on CPU)
    audit_max_failures: int = 2  # audit failures of one rank before it is reported as faulty hardware


@dataclass
class ChaosConfig:
    """Fault injection (anychip/chaos.py): proves the guards and the recovery work."""

    at: list[str] = field(default_factory=list)  # "kind@step" or "kind@step:rank", e.g. ["nan@12", "kill@30:1"]
    every: int = 0  # a random fault about every this many steps; 0 = none
    kinds: list[str] = field(
        default_factory=lambda: [
            "kill",
            "exception",
            "hang",
            "nan",
            "bitflip",
            "slow",
            "corrupt_checkpoint",
            "checkpoint_write",
        ]  # fmt: skip
    )  # what random faults draw from
    seed: int = 0
    slow_s: float = 0.5  # delay per step of a slowed rank
    slow_steps: int = 20  # steps a slowed rank stays slow
    hang: str = "native"  # native: a native call that holds the GIL | stop: SIGSTOP


@dataclass
class GRPOConfig:
    """Reinforcement learning with verifiable rewards (``train.mode = "grpo"``, anychip/rl)."""

    prompts_per_step: int = 16  # prompts per rollout batch, all ranks together
    group_size: int = 8  # completions sampled per prompt (G)
    max_new_tokens: int = 96  # completion length cap (L_max)
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    loss: str = "grpo"  # grpo | bnpo | dr_grpo | dapo
    importance: str = "token"  # token | sequence (GSPO)
    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    eps_low: float = 0.2
    eps_high: float = 0.2  # DAPO's clip-higher: 0.28
    beta: float = 0.04  # weight of the k3 KL to the reference; 0 = no reference model
    ref_reset_interval: int = 0  # steps between resets of the reference to the policy; 0 = never
    iterations: int = 1  # optimisation passes over each rollout batch (mu)
    minibatches: int = 1  # optimizer updates per pass
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and sample more prompts
    max_sampling_rounds: int = 3  # sampling rounds per rollout batch with dynamic sampling
    overlong_filter: bool = False  # DAPO: truncated completions carry no loss
    overlong_buffer: int = 16  # L_cache of the "overlong" reward
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    seed: int = 0  # seed of the rollout sampler (the data split and prompt order follow train.seed)


@dataclass
class EvalConfig:
    n: int = 200  # held-out problems scored at the end of training
    max_new_tokens: int = 96
    batch_size: int = 50
    interval: int = 100  # steps between held-out loss measurements (and the last step); 0 = none
    loss_batches: int = 4  # fixed held-out batches of train.global_batch sequences each


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True  # rich progress bar on a terminal


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
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
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section [{name}]; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{name}] must be a table of keys, got {values!r}")
        section = getattr(cfg, name)
        hints = typing.get_type_hints(type(section))
        for key, value in values.items():
            where = f"{source}: {name}.{key} = {value!r}"
            if name == "model" and key not in hints:
                section.overrides[key] = _model_value(key, value, where)
                continue
            if key not in hints or key == "overrides":
                known = ", ".join(k for k in hints if k != "overrides")
                raise ConfigError(f"{source}: unknown key {name}.{key}; known keys of [{name}]: {known}")
            setattr(section, key, _coerce(value, hints[key], where))


def _model_value(key: str, value, where: str):
    fields = {f.name: f for f in dataclasses.fields(ModelArgs) if f.name != "hf_extra"}
    if key not in fields:
        known = ", ".join(["preset", "init_from", *fields])
        raise ConfigError(f"{where}: unknown key; known keys of [model]: {known}")
    hint = typing.get_type_hints(ModelArgs)[key]
    if key == "rope_scaling":
        raise ConfigError(f"{where}: rope_scaling cannot be set from a config file; choose a preset")
    return _coerce(value, hint, where)


# type hint -> (accepted Python types, what the error says); bool is never an int here
_SCALARS = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: (str, "a string"),
    dict: (dict, "a table"),
}


def _coerce(value, hint, where: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if isinstance(value, str) and value.lower() == "none" and type(None) in options:
            return None
        hint = next(o for o in options if o is not type(None))
        origin = typing.get_origin(hint)
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
        if hint is float and not math.isfinite(value):  # NaN passes every range check below
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


_CHOICES = {
    ("train", "mode"): ("pretrain", "sft", "grpo"),
    ("grpo", "loss"): ("grpo", "bnpo", "dr_grpo", "dapo"),
    ("grpo", "importance"): ("token", "sequence"),
    ("grpo", "advantage_scale"): ("group", "batch", "none"),
    ("train", "dtype"): ("auto", "float32", "bfloat16", "float16"),
    ("data", "source"): ("reasoning_gym", "jsonl", "text"),
    ("data", "reasoning"): ("columns", "expression"),
    ("device", "type"): ("auto", "cpu", "cuda", "npu", "xpu", "mps"),
    ("parallel", "strategy"): ("fsdp", "ddp"),
    ("chaos", "hang"): ("native", "stop"),
}
_POSITIVE = [
    ("train", "steps"), ("train", "global_batch"), ("train", "seq_len"), ("train", "log_interval"),
    ("parallel", "nproc"), ("parallel", "preempt_grace_s"), ("checkpoint", "keep"), ("eval", "max_new_tokens"), ("eval", "batch_size"),
    ("eval", "loss_batches"),
    ("guards", "nonfinite_max"), ("guards", "spike_window"), ("guards", "spike_threshold"), ("guards", "max_rollbacks"),
    ("guards", "watchdog_factor"), ("guards", "watchdog_startup_s"), ("guards", "collective_timeout_s"),
    ("guards", "straggler_factor"), ("guards", "audit_rows"), ("guards", "audit_max_failures"),
    ("grpo", "prompts_per_step"), ("grpo", "group_size"), ("grpo", "max_new_tokens"), ("grpo", "iterations"),
    ("grpo", "minibatches"), ("grpo", "max_sampling_rounds"), ("grpo", "overlong_buffer"),
]  # fmt: skip
_NON_NEGATIVE = [
    ("train", "micro_batch"), ("train", "warmup_steps"), ("train", "weight_decay"), ("train", "grad_clip"),
    ("checkpoint", "interval"), ("checkpoint", "keep_every"), ("parallel", "max_restarts"), ("eval", "n"),
    ("eval", "interval"),
    ("data", "heldout_size"), ("guards", "spike_min_history"), ("guards", "spike_min_rise"),
    ("guards", "spike_grad_threshold"), ("guards", "spike_grad_min_rise"), ("guards", "watchdog_grace_s"),
    ("guards", "straggler_interval"), ("guards", "replica_check_interval"), ("guards", "audit_interval"),
    ("chaos", "every"), ("chaos", "slow_s"), ("chaos", "slow_steps"),
    ("grpo", "temperature"), ("grpo", "top_k"), ("grpo", "eps_low"), ("grpo", "eps_high"), ("grpo", "beta"),
    ("grpo", "ref_reset_interval"),
]  # fmt: skip


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
    if not 0 < g.top_p <= 1:
        raise bad("grpo", "top_p", "in (0, 1]")
    if g.temperature <= 0:
        raise bad("grpo", "temperature", "> 0 (rollouts are sampled)")
    if g.group_size < 2 and g.advantage_scale == "group":
        raise bad("grpo", "group_size", ">= 2 (group-normalised advantages)")
    if not g.rewards or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in g.rewards.values()):
        raise bad("grpo", "rewards", "a table {name or module:function = weight}, e.g. {accuracy = 1.0, format = 0.1}")
    from .rl.rewards import BUILT_IN, load_function

    for name in g.rewards if check_inputs else ():  # importing a reward module runs its code
        if name not in BUILT_IN:
            try:
                load_function(name)
            except ValueError as e:
                raise bad("grpo", "rewards", f"importable reward functions ({e})") from None
    if "overlong" in g.rewards and not 0 < g.overlong_buffer <= g.max_new_tokens:
        raise bad("grpo", "overlong_buffer", f"<= grpo.max_new_tokens = {g.max_new_tokens}")


def _init_shape(kind: str, path: Path) -> dict:
    """The ModelArgs fields of the model ``model.init_from`` names (its config.json, or a
    checkpoint's meta.json), as JSON values."""
    import json

    if kind == "hf":
        from .models.hf import read_hf_config

        return json.loads(json.dumps(dataclasses.asdict(read_hf_config(path))))
    try:
        return json.loads((path / "meta.json").read_text())["model_shape"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {path / 'meta.json'} is unreadable ({e})") from None


def validate(cfg: Config, source: str = "config", check_inputs: bool = True) -> None:
    """Check values that each have a valid type but may be impossible; with ``check_inputs``
    also the files and modules training would read (see ``load_config``)."""

    def bad(section: str, key: str, expected: str) -> ConfigError:
        value = getattr(getattr(cfg, section), key)
        return ConfigError(f"{source}: {section}.{key} = {value!r} is invalid: expected {expected}")

    for (section, key), choices in _CHOICES.items():
        if getattr(getattr(cfg, section), key) not in choices:
            raise bad(section, key, "one of " + ", ".join(choices))
    for section, key in _POSITIVE:
        if getattr(getattr(cfg, section), key) <= 0:
            raise bad(section, key, "> 0")
    for section, key in _NON_NEGATIVE:
        if getattr(getattr(cfg, section), key) < 0:
            raise bad(section, key, ">= 0")
    t = cfg.train
    if not 0 < t.lr < 1:
        raise bad("train", "lr", "in (0, 1)")
    if not 0 <= t.min_lr_ratio <= 1:
        raise bad("train", "min_lr_ratio", "in [0, 1]")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(t, key) < 1:
            raise bad("train", key, "in [0, 1)")
    if t.global_batch % cfg.parallel.nproc:
        raise bad("train", "global_batch", f"a multiple of parallel.nproc = {cfg.parallel.nproc}")
    local = t.global_batch // cfg.parallel.nproc
    if t.micro_batch and local % t.micro_batch:
        raise bad("train", "micro_batch", f"a divisor of the {local} sequences per process")
    if cfg.model.preset not in PRESETS:
        raise bad("model", "preset", "one of " + ", ".join(PRESETS))
    if cfg.model.init_from and check_inputs:
        from .export import resolve_init

        try:
            kind, path = resolve_init(cfg.model.init_from)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{source}: model.init_from: {e}") from None
        shape = _init_shape(kind, path)
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
    if t.seq_len > args.max_position_embeddings:
        raise bad("train", "seq_len", f"<= model max_position_embeddings = {args.max_position_embeddings}")
    if cfg.data.source == "reasoning_gym":
        from reasoning_gym.factory import DATASETS

        unknown = [t for t in cfg.data.tasks if t not in DATASETS]
        if not cfg.data.tasks or unknown:
            raise bad("data", "tasks", "reasoning-gym task names, e.g. basic_arithmetic, chain_sum, countdown")
        extra = [t for t in cfg.data.task_options if t not in cfg.data.tasks]
        if extra or not all(isinstance(v, dict) for v in cfg.data.task_options.values()):
            raise bad("data", "task_options", "a table per task of data.tasks, e.g. [data.task_options.chain_sum]")
    if check_inputs and cfg.data.source in ("jsonl", "text") and not Path(cfg.data.path).exists():
        raise bad("data", "path", f"an existing corpus file for data.source = {cfg.data.source!r}")
    if cfg.guards.straggler_factor <= 1:
        raise bad("guards", "straggler_factor", "> 1")
    from .chaos import KINDS, parse_fault

    for spec in cfg.chaos.at:
        try:
            parse_fault(spec)
        except ValueError as e:
            raise ConfigError(f"{source}: chaos.at: {e}") from None
    if any(k not in KINDS for k in cfg.chaos.kinds):
        raise bad("chaos", "kinds", "fault kinds among " + ", ".join(KINDS))
    if check_inputs and cfg.data.tokenizer != "byte" and not Path(cfg.data.tokenizer).exists():
        raise bad("data", "tokenizer", '"byte" or the path of an existing tokenizer.json')
