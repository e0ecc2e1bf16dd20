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
from .errors import CheckpointError, ConfigError
from .init_from import read_meta, resolve_init
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
    (CheckpointError naming the problem) unless the caller has just done so (``verified``).
    The model is given memory only after its meta.json shapes are checked (``checkpoint_args``)
    and found in the checkpoint's DCP metadata and data files (``stored_tensors``)."""
    directory = Path(directory)
    problem = None if verified else verify(directory)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    args, meta = checkpoint_args(directory)
    with torch.device("meta"):  # memory only once every shape is checked against the checkpoint's files
        model = DeepSeekV3(args)
    stored_tensors(directory, model.state_dict(), args.tie_word_embeddings)
    model.to_empty(device="cpu")
    if args.tie_word_embeddings:  # to_empty gives each name a tensor of its own
        model.lm_head.weight = model.embed_tokens.weight
    state = {"model": model.state_dict()}
    safe_load(state, directory, no_dist=True)  # the metadata pickle through an allow-list
    model.load_state_dict(state["model"])
    model.materialize_counters()
    return model.to(device), meta


def checkpoint_args(directory: Path) -> tuple[ModelArgs, dict]:
    """The ModelArgs of one checkpoint directory and its meta.json: the training-time terms
    of its config.toml with the shapes of its meta.json. Nothing beyond the directory is read
    (corpus, tokenizer, init_from: a copied run exports too) and no reward module is imported.

    Every value of meta.json's ``model_shape`` is checked for its type and bounds before it
    is used (``models/deepseek/bounds.py``): ConfigError naming the file and the key; an
    unreadable meta.json is a CheckpointError naming it."""
    cfg = load_config(directory / "config.toml", check_inputs=False)
    meta, shape = read_meta(directory)
    if shape.get("rope_scaling"):
        shape["rope_scaling"] = YarnScaling(**shape["rope_scaling"])
    try:
        return cfg.model_args().replace(**shape), meta
    except ConfigError as e:
        raise ConfigError(f"{directory / 'meta.json'}: {e}") from None


def checkpoint_tensors(directory: Path, args: ModelArgs) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(name, shape, dtype) of each model tensor of checkpoint ``directory`` that a Hugging
    Face directory holds (a tied ``lm_head.weight`` is not), in the model's state-dict order,
    as its DCP metadata gives them (nothing else is read). Raises what ``stored_tensors``
    raises."""
    with torch.device("meta"):  # names, order and shapes only: no memory
        state = DeepSeekV3(args).state_dict()
    needed = {hf_to_slot(args, key).name for key, _ in to_hf(args, state)}
    return stored_tensors(directory, {name: t for name, t in state.items() if name in needed})


def check_checkpoint_tensors(directory: Path, args: ModelArgs) -> None:
    """Check that checkpoint ``directory`` holds every model tensor of ``args`` as
    ``stored_tensors`` requires, from its metadata alone (nothing is allocated): raises what
    ``stored_tensors`` raises."""
    with torch.device("meta"):
        state = DeepSeekV3(args).state_dict()
    stored_tensors(directory, state, args.tie_word_embeddings)


def stored_tensors(
    directory: Path, state: dict[str, torch.Tensor], tied: bool = False
) -> list[tuple[str, torch.Size, torch.dtype]]:
    """(name, shape, dtype) of each entry of ``state`` (a model's state dict, on the meta
    device or not) as the DCP metadata of checkpoint ``directory`` gives it, each checked
    before anything is allocated for it: the checkpoint holds ``model.NAME`` with the shape
    of ``state``'s tensor, floating-point where that tensor is (and not where it is not),
    and its bytes lie in the data files, whose sizes bound what the metadata may claim (the
    sum of its stored items' lengths may not exceed them; anychip writes uncompressed
    items). ``tied``: a tied ``lm_head.weight`` is ``embed_tokens.weight`` and not checked.
    Raises CheckpointError naming the directory and the tensor."""
    metadata = read_metadata(directory)
    stored = metadata.state_dict_metadata
    held: dict[str, int] = {}  # bytes stored for each key, as the metadata says
    files: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        held[index.fqn] = held.get(index.fqn, 0) + info.length
        files[info.relative_path] = files.get(info.relative_path, 0) + info.length
    for name, claimed in files.items():
        path = directory / name
        size = path.stat().st_size if path.is_file() else 0
        if claimed > size:
            raise CheckpointError(f"{path}: the DCP metadata puts {claimed} bytes in it; it holds {size}")
    tensors = []
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        key = f"model.{name}"
        info = stored.get(key)
        if info is None or not hasattr(info, "size"):
            raise CheckpointError(f"{directory}: the checkpoint holds no tensor {key}")
        if tuple(info.size) != tuple(t.shape):
            raise CheckpointError(
                f"{directory}: {key} has shape {tuple(info.size)}; its meta.json's model_shape gives {tuple(t.shape)}"
            )
        dtype = info.properties.dtype
        if dtype.is_floating_point != t.dtype.is_floating_point:
            raise CheckpointError(f"{directory}: {key} holds {dtype} values; the model's {name} is {t.dtype}")
        if nbytes(info.size, dtype) > held.get(key, 0):
            raise CheckpointError(
                f"{directory}: {key} of shape {tuple(info.size)} needs {nbytes(info.size, dtype)} bytes; "
                f"its data files hold {held.get(key, 0)} for it"
            )
        tensors.append((name, info.size, dtype))
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
