"""`anychip export`: a run's checkpoint (or its final model) as a Hugging Face directory;
and where a run starts from (``model.init_from``): a Hugging Face directory, a run, or one
checkpoint of a run."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed.checkpoint as dcp

from .checkpoint import CheckpointError, committed, step_dir, verify
from .config import load_config
from .models import DeepSeekV3, YarnScaling, save_hf


def export(run_dir: str | Path, out: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    """Write the model of checkpoint ``step`` (default: the newest verified one) of
    ``run_dir`` with ``save_hf``. Runs in one process whatever the world size of the
    run (DCP reshards). Raises CheckpointError when the checkpoint is missing or fails
    verification."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    if step is None:
        candidates = committed(root)
        if not candidates:
            raise CheckpointError(f"{root}: no committed checkpoint")
        directory = candidates[0]
    else:
        directory = step_dir(root, step)
        if not directory.is_dir():
            steps = [int(p.name.split("_")[1]) for p in committed(root)]
            raise CheckpointError(f"{directory}: no checkpoint of step {step}; committed steps: {steps}")
    model, meta = checkpoint_model(directory)
    path = save_hf(model, out, overwrite=overwrite)
    (Path(path) / "anychip_export.json").write_text(json.dumps({"run": str(run_dir), "step": meta["step"]}))
    return path


def checkpoint_model(directory: str | Path, device="cpu") -> tuple[DeepSeekV3, dict]:
    """The model of one committed checkpoint directory (verified first) and its meta.json,
    in one process whatever the world size that wrote it (DCP reshards)."""
    directory = Path(directory)
    problem = verify(directory)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    cfg = load_config(directory / "config.toml")  # for the training-time terms; shapes come from the checkpoint
    meta = json.loads((directory / "meta.json").read_text())
    shape = dict(meta["model_shape"])  # the checkpoint's own shapes (also right for init_from runs)
    if shape.get("rope_scaling"):
        shape["rope_scaling"] = YarnScaling(**shape["rope_scaling"])
    args = cfg.model_args().replace(**shape)
    model = DeepSeekV3(args)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(directory), no_dist=True)
    model.load_state_dict(state["model"])
    model.materialize_counters()
    return model.to(device), meta


def resolve_init(spec: str) -> tuple[str, Path]:
    """What ``model.init_from`` names: ("hf", DIR) for a Hugging Face directory (``hf:DIR``,
    or a directory with config.json, or a run's ``final/``) or ("checkpoint", DIR) for a
    checkpoint directory (or a run without ``final/``: its newest committed checkpoint).
    Raises FileNotFoundError for a missing path, ValueError for one that holds no model."""
    path = Path(spec.removeprefix("hf:"))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if spec.startswith("hf:") or (path / "config.json").is_file():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json)")
        return "hf", path
    if (path / "meta.json").is_file() and (path / "manifest.json").is_file():
        return "checkpoint", path
    if (path / "final" / "config.json").is_file():
        return "hf", path / "final"
    found = committed(path / "checkpoints")
    if found:
        return "checkpoint", found[0]
    raise ValueError(
        f"{path} holds no model: expected a Hugging Face directory (config.json), an anychip run "
        "(final/ or checkpoints/) or a checkpoint directory (step_N with meta.json)"
    )


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
