"""Where a run starts from (``model.init_from``): a Hugging Face directory, an anychip run
(its ``final/`` model, else its newest committed checkpoint) or one checkpoint of a run.

``resolve_init`` says which of these a path is; ``init_shape`` reads the model shapes it
holds, which the configuration check compares with the ``[model]`` overrides (a checkpoint's
through ``read_meta``, which type-checks and bounds each one). Loading the model itself is
``anychip.export.load_init``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .checkpoint import committed
from .errors import CheckpointError, ConfigError
from .models.deepseek.bounds import check_model_fields
from .models.hf import read_hf_config


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


def init_shape(kind: str, path: Path) -> dict:
    """The ModelArgs fields of the model ``model.init_from`` names (its config.json, or a
    checkpoint's meta.json), as JSON values; ``kind`` and ``path`` as ``resolve_init``
    returns them. Each value is type-checked and bounded first (``models/deepseek/bounds.py``):
    ConfigError naming the file and the key."""
    if kind == "hf":
        return json.loads(json.dumps(dataclasses.asdict(read_hf_config(path))))
    try:
        return read_meta(path)[1]
    except CheckpointError as e:
        raise ConfigError(f"model.init_from: {e}") from None


def read_meta(directory: Path) -> tuple[dict, dict]:
    """meta.json of checkpoint ``directory`` and its ``model_shape`` (the checkpoint's own
    shapes, also right for init_from runs), each field type-checked and bounded
    (``check_model_fields``). Raises CheckpointError naming the file when it is missing or
    not a JSON object with a ``model_shape`` table, ConfigError naming the file and the key
    for a shape field of the wrong type, beyond its maximum, or unknown."""
    file = directory / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    shape = meta.get("model_shape") if isinstance(meta, dict) else None
    if not isinstance(shape, dict):
        raise CheckpointError(f"{file}: holds no model_shape table")
    check_model_fields(shape, f"{file}: model_shape")
    return meta, dict(shape)
