"""Hugging Face format in and out: ``config.json`` plus (sharded) safetensors in the
transformers DeepseekV3 layout. Only safetensors are read: no pickle is ever loaded."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, ConfigError
from .deepseek.args import ModelArgs, YarnScaling
from .deepseek.init import shard_rows
from .deepseek.model import DeepSeekV3
from .deepseek.state_dict_adapter import Slot, hf_to_slot, to_hf
from .safetensors_stream import SafetensorsWriter, nbytes

# config.json fields that map one to one onto ModelArgs
_DIRECT = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "attention_bias",
    "max_position_embeddings",
    "rope_interleave",
    "intermediate_size",
    "first_k_dense_replace",
    "moe_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "num_nextn_predict_layers",
)
# carried through unchanged so a round trip keeps them; they do not change the math
_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id")
# describe the file or the serving setup, not the model: accepted and not used
_METADATA = (
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "auto_map",
    "output_router_logits",
    "ep_size",
    "_name_or_path",
    "num_key_value_heads",
)
# fields that must hold this value, because it is the only one the architecture has
_FIXED = {
    "hidden_act": "silu",
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,
    "pretraining_tp": 1,
    "attention_dropout": 0.0,
}
_YARN_KEYS = {
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "truncate",
}


def args_from_hf_config(cfg: dict, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a DeepseekV3 ``config.json`` dict (Hub or transformers 5 style).

    Raises ConfigError naming the field for an unknown field, an unsupported value
    (e.g. FP8 ``quantization_config``), or a value the architecture cannot take.
    """

    def fail(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: field {key!r} {msg}")

    cfg = dict(cfg)
    if cfg.get("model_type", "deepseek_v3") != "deepseek_v3":
        raise fail("model_type", f"is {cfg['model_type']!r}; expected 'deepseek_v3'")
    if "quantization_config" in cfg:
        method = cfg["quantization_config"].get("quant_method", "?")
        raise fail("quantization_config", f"declares {method!r} weights; dequantize to bf16/fp32 first")
    kw: dict = {}
    for key in _DIRECT:
        if key in cfg:
            kw[key] = cfg.pop(key)
    if "num_mtp_layers" in cfg:
        kw["num_nextn_predict_layers"] = cfg.pop("num_mtp_layers")
    for key in ("n_group", "topk_group"):
        if key in kw and kw[key] is None:
            kw[key] = 1
    if kw.get("n_routed_experts") is None and "n_routed_experts" in kw:
        if kw.get("first_k_dense_replace", 0) < kw.get("num_hidden_layers", 1):
            raise fail("n_routed_experts", "is null but the model has MoE layers")
        del kw["n_routed_experts"]
    extra = {k: cfg.pop(k) for k in _CARRIED if k in cfg}
    for key in _METADATA:
        cfg.pop(key, None)
    for key, value in _FIXED.items():
        if key in cfg and cfg.pop(key) != value:
            raise fail(key, f"must be {value!r} for DeepSeek-V3 (got a different value)")
    alpha, seq_aux = cfg.pop("aux_loss_alpha", 0.0), cfg.pop("seq_aux", True)
    if alpha and not seq_aux:
        raise fail("seq_aux", "is false: only the sequence-wise balance loss is implemented")
    kw["seq_aux_loss_alpha"] = float(alpha or 0.0)

    rope = dict(cfg.pop("rope_parameters", None) or cfg.pop("rope_scaling", None) or {})
    cfg.pop("rope_scaling", None)
    theta = cfg.pop("rope_theta", None)
    theta = rope.pop("rope_theta", theta)
    if theta is not None:
        kw["rope_theta"] = float(theta)
    unknown_rope = set(rope) - _YARN_KEYS
    if unknown_rope:
        raise fail("rope_scaling", f"has unknown keys {sorted(unknown_rope)}")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type == "yarn":
        if not rope.pop("truncate", True):
            raise fail("rope_scaling", "sets truncate=false, which is not supported")
        factor = rope.get("factor")
        orig = rope.get("original_max_position_embeddings")
        if orig is None:
            raise fail("rope_scaling", "lacks original_max_position_embeddings for yarn")
        if factor is None:
            factor = kw.get("max_position_embeddings", ModelArgs.max_position_embeddings) / orig
        kw["rope_scaling"] = YarnScaling(
            factor=float(factor),
            original_max_position_embeddings=int(orig),
            beta_fast=float(rope.get("beta_fast") or 32),
            beta_slow=float(rope.get("beta_slow") or 1),
            mscale=float(rope.get("mscale") or 0.0),
            mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
        )
    elif rope_type != "default":
        raise fail("rope_scaling", f"has type {rope_type!r}; supported: 'default', 'yarn'")

    head_dim, qk_head_dim = cfg.pop("head_dim", None), cfg.pop("qk_head_dim", None)
    if cfg:
        raise fail(sorted(cfg)[0], f"is not a DeepSeek-V3 field anychip knows (all unknown: {sorted(cfg)})")
    try:
        args = ModelArgs(**kw, hf_extra=extra)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None
    if head_dim is not None and head_dim != args.qk_rope_head_dim:
        raise fail("head_dim", f"= {head_dim} disagrees with qk_rope_head_dim = {args.qk_rope_head_dim}")
    if qk_head_dim is not None and qk_head_dim != args.qk_head_dim:
        raise fail("qk_head_dim", f"= {qk_head_dim} disagrees with qk_nope + qk_rope = {args.qk_head_dim}")
    return args


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """A ``config.json`` dict that transformers' DeepseekV3Config reads back to the same model."""
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3"}
    cfg.update({k: getattr(args, k) for k in _DIRECT})
    cfg.update(
        hidden_act="silu",
        num_key_value_heads=args.num_attention_heads,
        rope_theta=args.rope_theta,
        rope_scaling=None,
        aux_loss_alpha=args.seq_aux_loss_alpha,
        seq_aux=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if args.rope_scaling is not None:
        s = args.rope_scaling
        cfg["rope_scaling"] = {
            "type": "yarn",
            "factor": s.factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
            "beta_fast": s.beta_fast,
            "beta_slow": s.beta_slow,
            "mscale": s.mscale,
            "mscale_all_dim": s.mscale_all_dim,
        }
    cfg.update(args.hf_extra)
    return cfg


def read_hf_config(path: str | os.PathLike) -> ModelArgs:
    """ModelArgs of a Hugging Face model directory (reads only ``config.json``)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a Hugging Face model directory needs config.json")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    return args_from_hf_config(cfg, str(file))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e!r})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
    return files


MTP_MODES = ("auto", "require", "drop")
_HF_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def load_hf(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    mtp: str = "auto",
    **overrides,
) -> DeepSeekV3:
    """Build a DeepSeekV3 from a Hugging Face directory (``config.json`` + safetensors).

    The model is created on the meta device, then materialised on ``device`` and each
    tensor read once into its final place (``fill_from_hf``), so peak memory is one copy of
    the weights. ``overrides`` replace ModelArgs fields that do not change shapes (e.g.
    ``mtp_loss_weight``). ``dtype``: of every tensor but the router weights and balancing
    biases (float32).

    ``mtp`` says what becomes of the multi-token-prediction modules that config.json
    declares (``num_nextn_predict_layers``):

    - "auto" (default): loaded when the files hold them. When the files hold no tensor of
      any MTP module (transformers' ``save_pretrained`` keeps the field but writes none),
      the main model is loaded exactly, the MTP modules are initialised afresh
      (``DeepSeekV3.init_weights``' rules, seed 0) and a warning names the directory.
    - "require": MTP tensors absent from the files are an error like any other.
    - "drop": the model is built without MTP modules; MTP tensors in the files are ignored.

    The returned model's ``mtp_initialized`` is True when its MTP modules were initialised
    rather than loaded (the training loop records it), else False.

    Raises what ``hf_model_args`` and ``fill_from_hf`` raise.
    """
    args = hf_model_args(path, mtp, **overrides)
    with torch.device("meta"):
        model = DeepSeekV3(args)
    if dtype != torch.float32:
        model.to(dtype)
        for m in model.moe_layers():
            m.gate.float()
    model.to_empty(device=device)
    if args.tie_word_embeddings:  # to_empty gives each name a tensor of its own
        model.lm_head.weight = model.embed_tokens.weight
    model.mtp_initialized = fill_from_hf(model, path, mtp)
    return model


def hf_model_args(path: str | os.PathLike, mtp: str = "auto", **overrides) -> ModelArgs:
    """The ModelArgs of the model ``load_hf(path, mtp=mtp, **overrides)`` builds. Raises
    ConfigError for a bad config.json, ValueError for an unknown ``mtp``."""
    if mtp not in MTP_MODES:
        raise ValueError(f"mtp={mtp!r}; expected one of {MTP_MODES}")
    declared = read_hf_config(path)
    args = declared.replace(num_nextn_predict_layers=0) if mtp == "drop" else declared
    return args.replace(**overrides) if overrides else args


READ_BYTES_PER_OPEN = 256 << 20  # a safetensors file is mapped whole: remapped after this many bytes read


@torch.no_grad()
def fill_from_hf(model: DeepSeekV3, path: str | os.PathLike, mtp: str = "auto") -> bool:
    """Copy the weights of the Hugging Face directory ``path`` into ``model``, which is
    materialised and built with ``hf_model_args(path, mtp)``: whole, or sharded along
    dimension 0 (FSDP2, expert parallelism), in which case this rank reads only the rows of
    its own shards (safetensors slices) and never holds a whole tensor it does not own.
    Returns True when the MTP modules were initialised afresh instead (see ``load_hf``).

    Every slot of every anychip tensor (each expert of a stacked tensor, each half of a
    fused gate/up matrix) must be given exactly once. Raises CheckpointError naming the file
    and tensor for a missing, unreadable, misshapen, duplicated or non-finite tensor (a
    non-finite value only where this rank reads it), or for MTP modules only partly present.
    """
    path = Path(path)
    declared = read_hf_config(path)
    args = model.args
    targets = model.state_dict(keep_vars=True)
    if args.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    shapes = {n: torch.empty(t.shape, device="meta") for n, t in targets.items()}
    expected = {hf_to_slot(args, key): key for key, _ in to_hf(args, shapes)}  # every slot, with its HF name
    shards = {n: (*shard_rows(t), tuple(t.shape)) for n, t in targets.items()}  # (local, first row, full shape)
    filled: dict[Slot, Path] = {}
    mtp_tensors = 0
    for file in _weight_files(path):
        try:
            for f, key in _keys_remapped(file):
                if _is_mtp(declared, key):
                    mtp_tensors += 1
                    if mtp == "drop":
                        continue
                _load_tensor(args, f, key, file, shards, expected, filled)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    fresh_mtp = mtp == "auto" and args.num_nextn_predict_layers > 0 and mtp_tensors == 0
    missing = [s for s in expected if s not in filled and not (fresh_mtp and s.name.startswith("mtp."))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {expected[missing[0]]!r} ({_describe(missing[0])}) is missing{more}")
    if fresh_mtp:
        warnings.warn(
            f"{path}: config.json declares {args.num_nextn_predict_layers} MTP module(s) but the files hold no "
            "MTP tensor; the main model is loaded exactly and the MTP modules are initialised afresh (seed 0). "
            "Pass mtp='drop' to build the model without them.",
            stacklevel=2,
        )
    model.materialize_counters()
    if fresh_mtp:  # their tensors were left as they were materialised
        model.init_weights(seed=0, prefix="mtp.")
    return fresh_mtp


def _keys_remapped(file: Path):
    """(open file, key) for every tensor of ``file``, the file opened anew after every
    READ_BYTES_PER_OPEN bytes: the pages of a mapping stay resident until it is closed."""
    with safe_open(file, framework="pt", device="cpu") as f:
        keys = list(f.keys())
    done = 0
    while done < len(keys):
        with safe_open(file, framework="pt", device="cpu") as f:
            read = 0
            while done < len(keys) and read < READ_BYTES_PER_OPEN:
                yield f, keys[done]
                read += _tensor_bytes(f, keys[done])
                done += 1


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _tensor_bytes(f, key: str) -> int:
    sl = f.get_slice(key)
    n = 1
    for d in sl.get_shape():
        n *= d
    return n * _DTYPE_BYTES.get(sl.get_dtype(), 4)


def _is_mtp(args: ModelArgs, key: str) -> bool:
    """Whether HF tensor ``key`` belongs to one of the MTP modules ``args`` declares."""
    m = _HF_LAYER_INDEX.match(key)
    return m is not None and 0 <= int(m.group(1)) - args.num_hidden_layers < args.num_nextn_predict_layers


def _describe(slot: Slot) -> str:
    where = f"anychip {slot.name!r}"
    if slot.expert is not None:
        where += f", expert {slot.expert}"
    if slot.half is not None:
        where += ", gate rows" if slot.half == 0 else ", up rows"
    return where


def _load_tensor(args, f, key: str, file: Path, shards: dict, expected: dict, filled: dict) -> None:
    """Copy this rank's rows of HF tensor ``key`` into its slot; checks the whole tensor's
    shape (from the file's header) on every rank, reads only the rows this rank holds."""
    try:
        slot = hf_to_slot(args, key)
    except KeyError:
        raise CheckpointError(f"{file}: tensor {key!r} does not belong to this DeepSeek-V3 config") from None
    if slot is None:
        return
    if slot not in expected:
        raise CheckpointError(f"{file}: tensor {key!r} ({_describe(slot)}) does not belong to this config")
    if slot in filled:
        raise CheckpointError(f"{file}: tensor {key!r} is given more than once (also in {filled[slot]})")
    local, start, full = shards[slot.name]
    stop = start + local.shape[0]
    want = tuple(full[1:]) if slot.expert is not None else tuple(full)
    if slot.half is not None:
        want = (want[0] // 2, *want[1:])
    sl = f.get_slice(key)
    if tuple(sl.get_shape()) != want:
        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(sl.get_shape())}; expected {want}")
    filled[slot] = file
    if slot.expert is not None:  # one expert of a stacked tensor: whole, if this rank holds it
        if not start <= slot.expert < stop:
            return
        dest, src_rows = local[slot.expert - start], (0, want[0])
        if slot.half is not None:
            dest = dest.chunk(2, dim=0)[slot.half]
    else:  # rows [first, first + len) of the anychip tensor come from this HF tensor
        first = slot.half * want[0] if slot.half is not None else 0
        lo, hi = max(start, first), min(stop, first + want[0])
        if lo >= hi:
            return
        dest, src_rows = local[lo - start : hi - start], (lo - first, hi - first)
    src = sl[src_rows[0] : src_rows[1]] if len(want) else f.get_tensor(key)
    if src.is_floating_point() and not torch.isfinite(src).all():
        raise CheckpointError(f"{file}: tensor {key!r} holds NaN or Inf values")
    dest.copy_(src.view(dest.shape))


# what save_hf and export write, and what transformers' save_pretrained writes beside them
_EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "anychip_export.json",
    }
)
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def check_save_target(
    path: str | os.PathLike, overwrite: bool = False, protect: str | os.PathLike | None = None
) -> None:
    """Raise FileExistsError, naming ``path`` and the reason, unless ``save_hf`` may write
    ``path``; touches nothing.

    Never writable (paths compared resolved, symlinks followed): the filesystem root, the
    home directory, the current working directory, ``protect`` (e.g. the run being
    exported), or any directory that contains one of them. An existing non-empty ``path``
    is replaced only with ``overwrite`` and only when it holds nothing but the files of a
    previous export (config.json, generation_config.json, model.safetensors,
    model-NNNNN-of-NNNNN.safetensors, model.safetensors.index.json, anychip_export.json):
    any other file, or any subdirectory, is refused and named.
    """
    path = Path(path)
    real = path.resolve()
    guarded = [(Path("/").resolve(), "the filesystem root")]
    with contextlib.suppress(RuntimeError):  # RuntimeError: no home directory can be determined
        guarded.append((Path.home().resolve(), "the home directory"))
    guarded.append((Path.cwd().resolve(), "the current working directory"))
    if protect is not None:
        guarded.append((Path(protect).resolve(), "the run being exported"))
    for p, what in guarded:
        if p.is_relative_to(real):
            relation = "is" if p == real else "contains"
            raise FileExistsError(f"{path}: refusing to write a model here: it {relation} {what} ({p})")
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path}: exists and is not a directory")
    entries = sorted(path.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(f"{path}: exists and is not empty; pass overwrite=True to replace it")
    for e in entries:
        if not (e.is_file() and (e.name in _EXPORT_FILES or _SHARD_FILE.fullmatch(e.name))):
            kind = "directory" if e.is_dir() else "file"
            raise FileExistsError(
                f"{path}: will not replace it: it holds the {kind} {e.name!r}, which is not part of a Hugging "
                "Face export (remove it yourself, or choose another directory)"
            )


def remove_save_leftovers(path: str | os.PathLike) -> list[Path]:
    """Delete what an interrupted ``save_hf`` of ``path`` left beside it: the directories
    ``.{name}.tmp-*`` (an unfinished write) and ``.{name}.old-*`` (a replaced export not yet
    deleted), and return them. Call it only while no ``save_hf`` of ``path`` runs; ``path``
    itself and anything else are never touched."""
    path = Path(path).resolve()
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-.+")
    removed = []
    for p in sorted(path.parent.iterdir()):
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            removed.append(p)
    return removed


def save_hf(
    model: DeepSeekV3,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    protect: str | os.PathLike | None = None,
    writer: bool = True,
) -> Path:
    """Write ``model`` as a Hugging Face directory that
    ``transformers.DeepseekV3ForCausalLM.from_pretrained`` loads.

    Tensors are written in the Hub's per-expert layout, cast to ``dtype`` (default: the
    model's) except the router weights and balancing biases (float32), sharded by
    ``max_shard_bytes``. Everything is written into a temporary sibling directory that
    replaces ``path`` only once complete: a crash leaves any earlier ``path`` intact (and
    perhaps a leftover for ``remove_save_leftovers``).

    Before anything is written, ``check_save_target(path, overwrite, protect)`` raises
    FileExistsError for a path it must not replace: an existing non-empty ``path`` needs
    ``overwrite`` and must hold only a previous export's files; the root, home, the
    working directory and ``protect`` are never replaced.

    The model streams out (``save_hf_streamed``): one of its tensors at a time is
    converted and written, so saving adds one tensor to the memory held, not a copy of the
    model. A sharded model (DTensor parameters: FSDP2, expert parallelism) is saved by all
    its ranks together, each calling ``save_hf`` with ``writer`` true on one rank only: each
    tensor is gathered whole in turn, and only the writer touches the filesystem.
    """
    state = model.state_dict()

    def fetch(name: str) -> torch.Tensor:
        t = state[name]
        return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor: a collective

    tensors = [(name, t.shape, t.dtype) for name, t in state.items()]
    dtype = dtype or model.embed_tokens.weight.dtype
    return save_hf_streamed(model.args, tensors, fetch, path, dtype, max_shard_bytes, overwrite, protect, writer)


# written in float32 whatever the dtype asked, as load_hf reads them: they decide which experts run
_FP32_SUFFIXES = ("e_score_correction_bias", "mlp.gate.weight")


def save_hf_streamed(
    args: ModelArgs,
    tensors: Sequence[tuple[str, Sequence[int], torch.dtype]],
    fetch: Callable[[str], torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    protect: str | os.PathLike | None = None,
    writer: bool = True,
) -> Path:
    """``save_hf`` of a model given tensor by tensor: ``tensors`` are its state-dict entries
    (anychip name, whole shape, dtype) in state-dict order, and ``fetch(name)`` returns the
    whole tensor ``name`` (on any device). Files, names, shards, casts (``dtype`` default:
    that of ``embed_tokens.weight``) and the safety of the write are ``save_hf``'s, and so
    are the bytes: each file is what ``safetensors.torch.save_file`` writes.

    Each tensor is fetched once, in order (a tied ``lm_head.weight`` not at all), split into
    the Hub's tensors, cast and written to its place in its file before the next is fetched:
    the memory held is one anychip tensor and one cast piece of it, whatever the model's size.

    ``fetch`` may be a collective (a DTensor's ``full_tensor``): every rank then calls this
    with the same ``tensors``, and only the one with ``writer`` writes; the others fetch each
    tensor in turn, drop it, and return ``path``. The writer raises (FileExistsError before
    its first fetch; whatever fails while writing) without fetching the rest, so the others
    wait in their next fetch until that collective fails (its timeout, or the writer's exit).
    """
    path = Path(path)
    dtype = dtype or next(d for name, _, d in tensors if name == "embed_tokens.weight")
    plan = []  # (anychip name, its Hub tensors (name, shape, dtype written)); meta tensors cost nothing
    for name, shape, source_dtype in tensors:
        meta = torch.empty(shape, dtype=source_dtype, device="meta")
        out = [
            (key, tuple(t.shape), torch.float32 if key.endswith(_FP32_SUFFIXES) else dtype)
            for key, t in to_hf(args, {name: meta})
        ]
        if out:
            plan.append((name, out))
    if not writer:
        for name, _ in plan:
            fetch(name)
        return path
    check_save_target(path, overwrite, protect)
    real = path.resolve()  # a symlinked path: its target is replaced, the link kept
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for entry in (e for _, out in plan for e in out):  # in to_hf order: a new file when this one is full
        n_bytes = nbytes(entry[1], entry[2])
        if shards[-1] and size + n_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n_bytes
    n = len(shards)
    fnames = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    shard_of = {key: i for i, shard in enumerate(shards) for key, _, _ in shard}
    unwritten = [len(shard) for shard in shards]
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-", dir=real.parent))
    files: dict[int, SafetensorsWriter] = {}  # open while some of their tensors are still to come
    try:
        for name, out in plan:
            for (key, piece), (_, _, cast) in zip(to_hf(args, {name: fetch(name)}), out, strict=True):
                i = shard_of[key]
                if i not in files:
                    files[i] = SafetensorsWriter(tmp / fnames[i], shards[i], metadata={"format": "pt"})
                files[i].write(key, piece.detach().to(device="cpu", dtype=cast))
                unwritten[i] -= 1
                if not unwritten[i]:
                    files.pop(i).close()
            del piece  # the fetched tensor goes before the next one comes
        for i in list(files):
            files.pop(i).close()  # (none left open: close names what is missing)
        if n > 1:
            total = sum(nbytes(shape, d) for shard in shards for _, shape, d in shard)
            weight_map = {key: fnames[i] for key, i in shard_of.items()}
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config_from_args(args, dtype), indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if real.exists():
            old = real.with_name(f".{real.name}.old-{os.getpid()}")
            real.rename(old)
            try:
                tmp.rename(real)
            except BaseException:
                old.rename(real)  # put the earlier export back
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(real)
    except BaseException:
        for f in files.values():
            f.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
