"""`anychip export`: a run's checkpoint (or its final model) as a Hugging Face directory."""

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
    cfg = load_config(run_dir / "config.toml")  # for the training-time terms; shapes come from the checkpoint
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
    problem = verify(directory)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
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
    path = save_hf(model, out, overwrite=overwrite)
    (Path(path) / "anychip_export.json").write_text(json.dumps({"run": str(run_dir), "step": meta["step"]}))
    return path
