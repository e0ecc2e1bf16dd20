"""Hugging Face format in and out: ``config.json`` plus (sharded) safetensors in the
transformers DeepseekV3 layout. Only safetensors are read: no pickle is ever loaded."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .deepseek.args import ConfigError, ModelArgs, YarnScaling
from .deepseek.model import DeepSeekV3
from .deepseek.state_dict_adapter import hf_to_slot, to_hf


class CheckpointError(RuntimeError):
    """A checkpoint or Hugging Face directory is missing, unreadable, corrupt, or does not
    fit the configuration."""


# config.json fields that map one to one onto ModelArgs
_DIRECT = (
    "vocab_size", "hidden_size", "num_hidden_layers", "rms_norm_eps", "tie_word_embeddings",
    "initializer_range", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
    "qk_rope_head_dim", "v_head_dim", "attention_bias", "max_position_embeddings", "rope_interleave",
    "intermediate_size", "first_k_dense_replace", "moe_intermediate_size", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "norm_topk_prob",
    "routed_scaling_factor", "num_nextn_predict_layers",
)  # fmt: skip
# carried through unchanged so a round trip keeps them; they do not change the math
_CARRIED = ("bos_token_id", "eos_token_id", "pad_token_id")
# describe the file or the serving setup, not the model: accepted and not used
_METADATA = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "auto_map", "output_router_logits", "ep_size", "_name_or_path", "num_key_value_heads",
)  # fmt: skip
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
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "truncate",
}  # fmt: skip


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


def load_hf(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **overrides,
) -> DeepSeekV3:
    """Build a DeepSeekV3 from a Hugging Face directory (``config.json`` + safetensors).

    The model is created on the meta device and each tensor is read once into its
    final place, so peak memory is one copy of the weights. ``overrides`` replace
    ModelArgs fields that do not change shapes (e.g. ``mtp_loss_weight``).
    Raises ConfigError for a bad config and CheckpointError naming the file and tensor
    for a missing, unreadable, misshapen, duplicated or non-finite tensor.
    """
    path = Path(path)
    args = read_hf_config(path)
    if overrides:
        args = args.replace(**overrides)
    with torch.device("meta"):
        model = DeepSeekV3(args)
    expected = model.state_dict()
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    fp32_names = {n for n in expected if n.endswith(("e_score_correction_bias", "mlp.gate.weight"))}
    targets = {
        n: torch.empty(t.shape, dtype=torch.float32 if n in fp32_names else dtype, device=device)
        for n, t in expected.items()
    }
    filled: dict[str, int] = {n: 0 for n in targets}
    for file in _weight_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    _load_tensor(args, f, key, file, targets, filled)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    for name, n in filled.items():
        want = targets[name].numel()
        if n != want:
            raise CheckpointError(f"{path}: tensor for {name!r} missing or incomplete ({n} of {want} values)")
    model.load_state_dict(targets, strict=not args.tie_word_embeddings, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.materialize_counters()
    return model


def _load_tensor(args, f, key: str, file: Path, targets: dict, filled: dict) -> None:
    try:
        slot = hf_to_slot(args, key)
    except KeyError:
        raise CheckpointError(f"{file}: tensor {key!r} does not belong to this DeepSeek-V3 config") from None
    if slot is None:
        return
    if slot.name not in targets:
        raise CheckpointError(f"{file}: tensor {key!r} (anychip {slot.name!r}) does not belong to this config")
    dest = slot.view(targets[slot.name])
    src = f.get_tensor(key)
    if tuple(src.shape) != tuple(dest.shape):
        raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(src.shape)}; expected {tuple(dest.shape)}")
    if src.is_floating_point() and not torch.isfinite(src).all():
        raise CheckpointError(f"{file}: tensor {key!r} holds NaN or Inf values")
    dest.copy_(src)
    filled[slot.name] += dest.numel()
    if filled[slot.name] > targets[slot.name].numel():
        raise CheckpointError(f"{file}: tensor {key!r} is given more than once")


def save_hf(
    model: DeepSeekV3,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face directory that
    ``transformers.DeepseekV3ForCausalLM.from_pretrained`` loads.

    Tensors are written in the Hub's per-expert layout, cast to ``dtype`` (default: the
    model's) except the router weights and balancing biases (float32), sharded by
    ``max_shard_bytes``. Everything is written into a temporary sibling directory that
    replaces ``path`` only once complete: a crash leaves any earlier ``path`` intact.
    An existing non-empty ``path`` is an error unless ``overwrite``.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path}: exists and is not empty; pass overwrite=True to replace it")
    args = model.args
    dtype = dtype or model.embed_tokens.weight.dtype
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, t in to_hf(args, model.state_dict()):
        if hasattr(t, "full_tensor"):  # DTensor from FSDP/TP: gather the whole tensor
            t = t.full_tensor()
        keep_fp32 = name.endswith(("e_score_correction_bias", "mlp.gate.weight"))
        tensors.append((name, t.detach().to(device="cpu", dtype=torch.float32 if keep_fp32 else dtype)))
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, start=1):
            fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file({k: v.contiguous().clone() for k, v in shard}, tmp / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k, _ in shard})
        if n > 1:
            total = sum(t.numel() * t.element_size() for _, t in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config_from_args(args, dtype), indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
