"""`anychip export`: a run's checkpoint (or its final model) as a Hugging Face directory;
and the model a run starts from (``model.init_from``, resolved by anychip/init_from.py)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import committed, step_dir, verify
from .config import load_config
from .dcp_reader import read_metadata, safe_load
from .errors import CheckpointError
from .init_from import resolve_init
from .models import DeepSeekV3, ModelArgs, YarnScaling
from .models.deepseek.state_dict_adapter import hf_to_slot, to_hf
from .models.hf import check_save_target, save_hf_streamed
from .models.safetensors_stream import nbytes

# export reads this many bytes of the checkpoint's model at a time (in one DCP load)
READ_BYTES = 256 * 2**20


def export(run_dir: str | Path, out: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    """Write the model of checkpoint ``step`` of ``run_dir`` as ``save_hf`` writes it, plus
    ``anychip_export.json`` (the run and the step). Runs in one process whatever the world
    size of the run (DCP reshards). The model is never whole in memory: the checkpoint is
    read a few tensors at a time (``READ_BYTES``) and each is written before the next group
    is read (``save_hf_streamed``).

    Without ``step``: the newest checkpoint that verifies; each newer one that does not is
    skipped with a warning naming it and its problem. Raises CheckpointError when no
    checkpoint verifies, or when checkpoint ``step`` is missing or fails verification.
    Raises FileExistsError, before reading any checkpoint, when ``out`` is the run, contains
    it or lies inside its ``checkpoints/``, or is a path ``save_hf`` would refuse
    (``check_save_target``): nothing is then written or deleted."""
    run_dir, out = Path(run_dir), Path(out)
    root = run_dir / "checkpoints"
    if out.resolve().is_relative_to(root.resolve()):
        raise FileExistsError(f"{out}: inside the run's checkpoints directory {root}; choose another --out")
    check_save_target(out, overwrite, protect=run_dir)
    if step is None:
        directory = newest_verified(root)
    else:
        directory = step_dir(root, step)
        if not directory.is_dir():
            steps = [int(p.name.split("_")[1]) for p in committed(root)]
            raise CheckpointError(f"{directory}: no checkpoint of step {step}; committed steps: {steps}")
    if step is not None and (problem := verify(directory)):
        raise CheckpointError(f"{directory}: {problem}")
    args, meta = checkpoint_args(directory)
    tensors = checkpoint_tensors(directory, args)
    fetch = checkpoint_reader(directory, tensors, READ_BYTES)
    path = save_hf_streamed(args, tensors, fetch, out, overwrite=overwrite, protect=run_dir)
    (Path(path) / "anychip_export.json").write_text(json.dumps({"run": str(run_dir), "step": meta["step"]}))
    return path


def newest_verified(root: Path) -> Path:
    """The newest committed checkpoint under ``root`` whose files match its manifest. Each
    newer one is skipped with a warning naming it and its problem (nothing is moved or
    deleted). Raises CheckpointError when there is none, naming every problem found."""
    problems = []
    for directory in committed(root):
        problem = verify(directory)
        if problem is None:
            if problems:
                skipped = "; ".join(problems)
                warnings.warn(
                    f"{root}: using {directory.name}, skipped corrupt newer checkpoints: {skipped}", stacklevel=2
                )
            return directory
        problems.append(f"{directory.name}: {problem}")
    if not problems:
        raise CheckpointError(f"{root}: no committed checkpoint")
    raise CheckpointError(f"{root}: no checkpoint verifies ({'; '.join(problems)})")


def checkpoint_model(directory: str | Path, device="cpu", verified: bool = False) -> tuple[DeepSeekV3, dict]:
    """The model of one committed checkpoint directory and its meta.json, in one process
    whatever the world size that wrote it (DCP reshards). The directory is verified first
    (CheckpointError naming the problem) unless the caller has just done so (``verified``)."""
    directory = Path(directory)
    problem = None if verified else verify(directory)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    args, meta = checkpoint_args(directory)
    model = DeepSeekV3(args)
    state = {"model": model.state_dict()}
    safe_load(state, directory, no_dist=True)  # the metadata pickle through an allow-list
    model.load_state_dict(state["model"])
    model.materialize_counters()
    return model.to(device), meta


def checkpoint_args(directory: Path) -> tuple[ModelArgs, dict]:
    """The ModelArgs of one checkpoint directory and its meta.json: the training-time terms
    of its config.toml with the shapes of its meta.json. Nothing beyond the directory is read
    (corpus, tokenizer, init_from: a copied run exports too) and no reward module is imported."""
    cfg = load_config(directory / "config.toml", check_inputs=False)
    meta = json.loads((directory / "meta.json").read_text())
    shape = dict(meta["model_shape"])  # the checkpoint's own shapes (also right for init_from runs)
    if shape.get("rope_scaling"):
        shape["rope_scaling"] = YarnScaling(**shape["rope_scaling"])
    return cfg.model_args().replace(**shape), meta


def checkpoint_tensors(directory: Path, args: ModelArgs) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(name, shape, dtype) of each model tensor of checkpoint ``directory`` that a Hugging
    Face directory holds (a tied ``lm_head.weight`` is not), in the model's state-dict order,
    as its DCP metadata gives them (nothing else is read). Raises CheckpointError naming the
    directory and the tensor when one is missing or its shape is not the one ``args`` give."""
    with torch.device("meta"):  # names, order and shapes only: no memory
        state = DeepSeekV3(args).state_dict()
    needed = {hf_to_slot(args, key).name for key, _ in to_hf(args, state)}
    stored = read_metadata(directory).state_dict_metadata
    tensors = []
    for name, t in state.items():
        if name not in needed:
            continue
        info = stored.get(f"model.{name}")
        if info is None or not hasattr(info, "size"):
            raise CheckpointError(f"{directory}: the checkpoint holds no tensor model.{name}")
        if tuple(info.size) != tuple(t.shape):
            raise CheckpointError(
                f"{directory}: model.{name} has shape {tuple(info.size)}; its meta.json's model_shape "
                f"gives {tuple(t.shape)}"
            )
        tensors.append((name, info.size, info.properties.dtype))
    return tensors


def checkpoint_reader(
    directory: Path, tensors: list[tuple[str, torch.Size, torch.dtype]], group_bytes: int = READ_BYTES
) -> Callable[[str], torch.Tensor]:
    """``fetch`` for ``save_hf_streamed``: model tensor ``name`` of checkpoint ``directory``.
    Asked for a tensor not read yet, it reads it and those that follow it in ``tensors`` up
    to ``group_bytes`` in all (at least the one asked) in one DCP load, since each load
    reads the checkpoint's metadata again; each tensor is handed out once and then dropped."""
    order = {name: i for i, (name, _, _) in enumerate(tensors)}
    group: dict[str, torch.Tensor] = {}

    def fetch(name: str) -> torch.Tensor:
        if name not in group:
            group.clear()
            size = 0
            for n, shape, dtype in tensors[order[name] :]:
                if group and size + nbytes(shape, dtype) > group_bytes:
                    break
                group[n] = torch.empty(shape, dtype=dtype)
                size += nbytes(shape, dtype)
            safe_load({"model": group}, directory, no_dist=True)
        return group.pop(name)

    return fetch


def load_init(spec: str, device="cpu", **overrides) -> DeepSeekV3:
    """The model ``model.init_from`` names (see ``resolve_init``); ``overrides`` replace
    shape-free fields (e.g. ``mtp_loss_weight``)."""
    from .models import load_hf

    kind, path = resolve_init(spec)
    if kind == "hf":
        return load_hf(path, device=device, **overrides)
    model, _ = checkpoint_model(path, device)
    if overrides:
        model.args = model.args.replace(**overrides)
    return model
