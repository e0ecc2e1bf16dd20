"""Models anychip trains, and their Hugging Face interop."""

from .deepseek import (
    PRESETS,
    DeepSeekV3,
    KVCache,
    ModelArgs,
    YarnScaling,
    count_parameters,
    preset,
    training_flops_per_token,
)
from .hf import load_hf, read_hf_config, save_hf

__all__ = [
    "PRESETS",
    "DeepSeekV3",
    "KVCache",
    "ModelArgs",
    "YarnScaling",
    "count_parameters",
    "load_hf",
    "preset",
    "read_hf_config",
    "save_hf",
    "training_flops_per_token",
]
