"""Where a run starts from (``model.init_from``): a Hugging Face directory, an anychip run
(its ``final/`` model, else its newest committed checkpoint) or one checkpoint of a run.

``resolve_init`` says which of these a path is; ``init_shape`` reads the model shapes it
holds, which the configuration check compares with the ``[model]`` overrides. Loading the
model itself is ``anychip.export.load_init``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .checkpoint import committed
from .errors import ConfigError
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
    returns them."""
    if kind == "hf":
        return json.loads(json.dumps(dataclasses.asdict(read_hf_config(path))))
    try:
        return json.loads((path / "meta.json").read_text())["model_shape"]
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.init_from: {path / 'meta.json'} is unreadable ({e})") from None
