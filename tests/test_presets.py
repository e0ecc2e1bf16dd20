"""Named sizes and parameter counts (computed on the meta device, nothing allocated)."""

import pytest

from anychip.errors import ConfigError
from anychip.models import PRESETS, DeepSeekV3, count_parameters, preset


def test_v3_matches_published_counts():
    total, active = count_parameters(preset("v3"))
    assert abs(total - 671e9) / 671e9 < 0.01
    # published as "37B activated": 2 significant digits
    assert round(active / 1e9) == 37
    with_mtp, _ = count_parameters(preset("v3"), include_mtp=True)
    # 685B on the Hub = 671B + MTP (11.6B) + the MTP layer's stored copies of embedding and head (2 x 0.93B)
    assert abs(with_mtp + 2 * 129280 * 7168 - 685e9) / 685e9 < 0.01


def test_v2_lite_matches_published_counts():
    total, active = count_parameters(preset("v2-lite"))
    assert abs(total - 15.7e9) / 15.7e9 < 0.01
    assert abs(active - 2.4e9) / 2.4e9 < 0.025  # published as "2.4B": 2 significant digits


def test_tiny_is_a_few_million_parameters():
    total, active = count_parameters(preset("tiny"), include_mtp=True)
    assert 2e6 < total < 10e6 and active < total


def test_every_preset_builds_on_meta():
    import torch

    for name, args in PRESETS.items():
        with torch.device("meta"):
            model = DeepSeekV3(args)
        assert len(model.layers) == args.num_hidden_layers, name


def test_unknown_preset_and_override():
    with pytest.raises(ConfigError, match="'huge'.*debug, tiny"):
        preset("huge")
    with pytest.raises(ConfigError, match="hidden_sizes"):
        preset("tiny", hidden_sizes=3)
    with pytest.raises(ConfigError, match="topk_group"):
        preset("tiny", topk_group=3)
