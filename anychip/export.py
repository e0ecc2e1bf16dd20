"""`anychip export`: a run's checkpoint (or its final model) as a Hugging Face directory;
and the model a run starts from (``model.init_from``, resolved by anychip/init_from.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .checkpoint import committed, step_dir, verify
from .config import load_config
from .dcp_reader import safe_load
from .errors import CheckpointError
from .init_from import resolve_init
from .models import DeepSeekV3, YarnScaling, save_hf
from .models.hf import check_save_target


def export(run_dir: str | Path, out: str | Path, step: int | None = None, overwrite: bool = False) -> Path:
    """Write the model of checkpoint ``step`` of ``run_dir`` with ``save_hf``, plus
    ``anychip_export.json`` (the run and the step). Runs in one process whatever the world
    size of the run (DCP reshards).

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
    model, meta = checkpoint_model(directory, verified=step is None)
    path = save_hf(model, out, overwrite=overwrite, protect=run_dir)
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
    # the training-time terms; shapes come from the checkpoint. Nothing beyond the file is read
    # (corpus, tokenizer, init_from: a copied run exports too) and no reward module is imported
    cfg = load_config(directory / "config.toml", check_inputs=False)
    meta = json.loads((directory / "meta.json").read_text())
    shape = dict(meta["model_shape"])  # the checkpoint's own shapes (also right for init_from runs)
    if shape.get("rope_scaling"):
        shape["rope_scaling"] = YarnScaling(**shape["rope_scaling"])
    args = cfg.model_args().replace(**shape)
    model = DeepSeekV3(args)
    state = {"model": model.state_dict()}
    safe_load(state, directory, no_dist=True)  # the metadata pickle through an allow-list
    model.load_state_dict(state["model"])
    model.materialize_counters()
    return model.to(device), meta


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
