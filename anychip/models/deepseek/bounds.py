"""What a file may say about a model's shapes: the type of each ModelArgs field and the
largest size anychip accepts for it.

Shapes come from files someone else may have written (a Hugging Face ``config.json``, a
checkpoint's ``meta.json``, a run's config): each value is checked here before any model
is built from it, so that a float, a string or 10**13 gets an error naming the file and the
key instead of a traceback from inside torch or an allocation that cannot succeed. The
maxima are far above every published model (DeepSeek-V3: vocabulary 129280, hidden 7168,
61 layers, 256 experts, 163840 positions); whether the sizes fit what a directory's
tensors hold is checked against its files (``fill_from_hf``, ``checkpoint_tensors``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping

from ...errors import ConfigError
from .args import ModelArgs, YarnScaling

# the largest value of each integer field; the smallest is 0 (ModelArgs says which must be > 0)
MAXIMA = {
    "vocab_size": 2**22,
    "hidden_size": 2**16,
    "num_hidden_layers": 1024,
    "num_attention_heads": 2**12,
    "q_lora_rank": 2**16,
    "kv_lora_rank": 2**16,
    "qk_nope_head_dim": 2**12,
    "qk_rope_head_dim": 2**12,
    "v_head_dim": 2**12,
    "max_position_embeddings": 2**24,
    "intermediate_size": 2**20,
    "first_k_dense_replace": 1024,
    "moe_intermediate_size": 2**20,
    "n_routed_experts": 2**14,
    "n_shared_experts": 2**8,
    "num_experts_per_tok": 2**14,
    "n_group": 2**14,
    "topk_group": 2**14,
    "num_nextn_predict_layers": 64,
    "original_max_position_embeddings": 2**24,  # of rope_scaling
}
_HINTS = typing.get_type_hints(ModelArgs)
_YARN_HINTS = typing.get_type_hints(YarnScaling)


def field_problem(key: str, value: object) -> str | None:
    """What is wrong with ``value`` for ModelArgs field ``key`` (None: nothing): an int field
    takes an int (never a bool, a float or a string) in [0, MAXIMA[key]], or None where the
    field allows it; a float field a finite number; a bool field true or false; rope_scaling
    None or a table of YarnScaling's fields."""
    if key not in _HINTS or key == "hf_extra":
        return "not a field of the model"
    if key == "rope_scaling":
        return _yarn_problem(value)
    return _value_problem(key, value, _HINTS[key])


def check_model_fields(fields: Mapping[str, object], source: str) -> None:
    """Raise ConfigError ``"{source}: {key} = {value!r} is invalid: expected ..."`` for the
    first entry of ``fields`` that ``field_problem`` refuses."""
    for key, value in fields.items():
        problem = field_problem(key, value)
        if problem:
            raise ConfigError(f"{source}: {key} = {_short(value)} is invalid: {problem}")


def _value_problem(key: str, value: object, hint) -> str | None:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    if value is None:
        return None if type(None) in options else f"expected {_expected(key, options)}, not null"
    if int in options:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected {_expected(key, options)}"
        if not 0 <= value <= MAXIMA.get(key, 2**31):
            return f"expected {_expected(key, options)}"
        return None
    if float in options:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return "expected a finite number"
        return None
    if bool in options and not isinstance(value, bool):
        return "expected true or false"
    return None


def _expected(key: str, options: tuple) -> str:
    text = f"an integer in [0, {MAXIMA.get(key, 2**31)}]"
    return f"{text} or null" if type(None) in options else text


def _yarn_problem(value: object) -> str | None:
    if value is None or isinstance(value, YarnScaling):
        return None
    if not isinstance(value, Mapping):
        return "expected null or a table of " + ", ".join(_YARN_HINTS)
    unknown = sorted(set(value) - set(_YARN_HINTS))
    if unknown:
        return f"has unknown keys {unknown}; expected those of {', '.join(_YARN_HINTS)}"
    required = [f.name for f in dataclasses.fields(YarnScaling) if f.default is dataclasses.MISSING]
    missing = [k for k in required if k not in value]
    if missing:
        return f"lacks {', '.join(missing)}"
    for k, v in value.items():
        problem = _value_problem(k, v, _YARN_HINTS[k])
        if problem:
            return f"{k} = {_short(v)}: {problem}"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
