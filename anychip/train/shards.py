"""The model on this rank, without ever a whole model on any rank.

    build on the meta device (no memory) -> the layout (activation checkpointing, compile,
    FSDP2 / expert parallelism) -> materialise only this rank's shards (``to_empty``) ->
    fill them: random init (values independent of the layout, ``models/deepseek/init.py``),
    or the model ``model.init_from`` names, read shard by shard: a Hugging Face directory
    through safetensors slices (``fill_from_hf``), a checkpoint through DCP into the
    sharded parameters (DCP reads the byte ranges of this rank's shards).

Under DDP, and on one process, every rank holds the whole model anyway: it is
materialised before the layout (DDP broadcasts rank 0's parameters when it wraps).

GRPO's reference policy is a second model sharded exactly like the policy, its local
shards copied from the policy's (``sharded_reference``); no rank gathers it either.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import verify
from ..config import Config
from ..dcp_reader import safe_load
from ..device import Device
from ..errors import CheckpointError
from ..export import checkpoint_args
from ..init_from import resolve_init
from ..models import DeepSeekV3, ModelArgs
from ..models.deepseek.args import SHAPE_FREE
from ..models.hf import fill_from_hf, hf_model_args
from ..parallel import World, copy_shards, parallelize, unwrap


def model_source(cfg: Config, vocab_size: int) -> tuple[ModelArgs, tuple[str, Path] | None]:
    """The run's ModelArgs and where its weights come from: None (random init) or
    ``resolve_init(model.init_from)``. Reads only config files. Raises ValueError when the
    init_from model's vocabulary is smaller than the tokenizer's."""
    if not cfg.model.init_from:
        return cfg.model_args(vocab_size), None
    shape_free = {k: v for k, v in cfg.model.overrides.items() if k in SHAPE_FREE}
    # the config refused shape fields that differ from the model's own
    kind, path = resolve_init(cfg.model.init_from)
    args = hf_model_args(path, **shape_free) if kind == "hf" else checkpoint_args(path)[0].replace(**shape_free)
    if args.vocab_size < vocab_size:
        raise ValueError(
            f"model.init_from {cfg.model.init_from}: vocab_size {args.vocab_size} < tokenizer's {vocab_size} tokens"
        )
    return args, (kind, path)


def materialize(model: DeepSeekV3, source: tuple[str, Path] | None, seed: int, device: Device, world: World) -> None:
    """Give ``model`` (built on meta, laid out or not) memory for this rank's shards only,
    and fill them (see the module). A bad or unreadable source raises CheckpointError on
    every rank (naming the file), never on one rank while the others wait for it."""
    core = unwrap(model)
    model.to_empty(device=device.torch_device(world.local_rank))
    if core.args.tie_word_embeddings:  # to_empty gives each name a tensor of its own
        core.lm_head.weight = core.embed_tokens.weight
    core.mtp_initialized = False
    if source is None:
        core.init_weights(seed=seed)
        return
    kind, path = source
    if kind == "hf":
        core.mtp_initialized = _on_every_rank(world, lambda: fill_from_hf(core, path))
        return
    problem = verify(path) if world.is_main else None  # rank 0 checksums, as a resume does
    if world.distributed:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    safe_load(state, path, no_dist=not world.distributed)  # into the shards: only their bytes are read
    set_model_state_dict(model, state["model"])
    core.materialize_counters()


def _on_every_rank(world: World, fill):
    """``fill()`` on every rank; an error on any rank is raised on all of them."""
    error, result = None, None
    try:
        result = fill()
    except Exception as e:  # noqa: BLE001 (whatever it is, the other ranks must hear of it)
        error = str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}"
    if world.distributed:
        errors = [None] * world.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise CheckpointError(error)
    return result


@torch.no_grad()
def sharded_reference(
    policy, world: World, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype
) -> torch.nn.Module:
    """GRPO's frozen reference: a model sharded like the FSDP2 ``policy`` (same layout,
    names and mixed precision), its shards copies of the policy's, in evaluation mode."""
    core = unwrap(policy)
    with torch.device("meta"):
        ref = DeepSeekV3(core.args)
    ref.requires_grad_(False)
    ref = parallelize(ref, world, "fsdp", param_dtype, reduce_dtype)
    ref.to_empty(device=core.embed_tokens.weight.device)
    copy_shards(policy, ref)
    return ref.eval()
