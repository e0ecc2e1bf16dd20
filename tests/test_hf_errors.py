"""Bad Hugging Face input gets an error naming the file, field or tensor; nothing saved is lost."""

import json

import pytest
import torch
from conftest import make_args, make_model
from safetensors.torch import load_file, save_file

from anychip.errors import CheckpointError, ConfigError
from anychip.models import load_hf, preset, save_hf
from anychip.models.hf import args_from_hf_config, hf_config_from_args

# config.json of deepseek-ai/DeepSeek-V3 as published (its quantization_config removed)
V3_HUB_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_published_v3_config_is_the_v3_preset():
    args = args_from_hf_config(V3_HUB_CONFIG)
    assert args == preset("v3").replace(seq_aux_loss_alpha=0.001)
    assert args.hf_extra == {"bos_token_id": 0, "eos_token_id": 1}
    assert args_from_hf_config(hf_config_from_args(args)) == args  # our own config.json reads back


@pytest.mark.parametrize(
    "change, field",
    [
        ({"sliding_window": 4096}, "sliding_window"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"model_type": "llama"}, "model_type"),
        ({"n_group": 7}, "n_group"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"head_dim": 128}, "head_dim"),
    ],
)
def test_bad_config_field_is_named(change, field):
    with pytest.raises(ConfigError, match=field) as err:
        args_from_hf_config({**V3_HUB_CONFIG, **change}, source="ckpt/config.json")
    assert "ckpt/config.json" in str(err.value)


def _saved(tmp_path):
    model = make_model(make_args())
    return model, save_hf(model, tmp_path / "hf")


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tmp_path)
    _, path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(path)


def test_truncated_file_is_named(tmp_path):
    _, path = _saved(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_hf(path)


def test_missing_extra_misshapen_and_nonfinite_tensors(tmp_path):
    _, path = _saved(tmp_path)
    f = path / "model.safetensors"
    good = load_file(f)

    def check(tensors, pattern):
        save_file(tensors, f)
        with pytest.raises(CheckpointError, match=pattern):
            load_hf(path)

    key = "model.layers.1.mlp.experts.5.down_proj.weight"
    check({k: v for k, v in good.items() if k != key}, "mlp.experts.down_proj.*missing")
    check({**good, "model.layers.9.mlp.gate.weight": good["model.layers.1.mlp.gate.weight"].clone()}, "layers.9")
    check({**good, key: good[key][:, :-1].contiguous()}, f"{key}.*shape")
    bad = good[key].clone()
    bad[0, 0] = float("nan")
    check({**good, key: bad}, f"{key}.*NaN")


def test_save_refuses_to_overwrite_and_keeps_the_old_directory(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, path)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("anychip.models.hf.SafetensorsWriter.write", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, path, overwrite=True)
    assert (path / "model.safetensors").read_bytes() == before  # the earlier save is intact
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary leftovers
    monkeypatch.undo()
    with torch.no_grad():
        model.norm.weight.fill_(2.0)
    save_hf(model, path, overwrite=True)
    assert torch.equal(load_hf(path).norm.weight, model.norm.weight)


def test_unknown_override_is_named(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(ConfigError, match="mtp_weight"):
        load_hf(path, mtp_weight=0.1)
    assert load_hf(path, mtp_loss_weight=0.1).args.mtp_loss_weight == 0.1


def test_config_json_is_readable_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _, path = _saved(tmp_path)
    cfg = transformers.AutoConfig.from_pretrained(path)
    assert cfg.model_type == "deepseek_v3" and cfg.kv_lora_rank == 12
    assert json.loads((path / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
