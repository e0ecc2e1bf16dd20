"""DeepSeek-V3 family: model, named sizes, Hugging Face name mapping."""

from .args import ModelArgs, YarnScaling
from .model import DeepSeekV3, KVCache, LossOutput
from .presets import PRESETS, count_parameters, preset, training_flops_per_token

__all__ = [
    "PRESETS",
    "DeepSeekV3",
    "KVCache",
    "LossOutput",
    "ModelArgs",
    "YarnScaling",
    "count_parameters",
    "preset",
    "training_flops_per_token",
]
