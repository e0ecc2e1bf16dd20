"""Logits equal transformers' DeepseekV3ForCausalLM with the same weights, both ways."""

import pytest
import torch
from conftest import make_args, make_model, to_transformers, transformers_deepseek

from anychip.models import YarnScaling, load_hf

CONFIGS = {
    "q_compression": {},
    "no_q_compression": dict(q_lora_rank=None),
    "groups_4_top2": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3),
    "single_group": dict(n_group=1, topk_group=1),
    "dense_only": dict(first_k_dense_replace=3),
    "no_norm_topk": dict(norm_topk_prob=False, routed_scaling_factor=1.0),
    "two_dense_layers": dict(num_hidden_layers=4, first_k_dense_replace=2),
    "yarn": dict(
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=1.0)
    ),
    "yarn_mscale_0707": dict(
        rope_scaling=YarnScaling(factor=8.0, original_max_position_embeddings=16, mscale=0.707, mscale_all_dim=0.707)
    ),
    "not_interleaved_bias_tied": dict(rope_interleave=False, attention_bias=True, tie_word_embeddings=True),
    "two_shared_experts_mtp": dict(n_shared_experts=2, num_nextn_predict_layers=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    args = make_args(**CONFIGS[name])
    ours = make_model(args, seed=len(name)).eval()
    peer = to_transformers(ours, tmp_path / "hf")
    x = torch.randint(0, args.vocab_size, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), peer(x).logits
    assert a.shape == (3, 21, args.vocab_size)
    assert (a - b).abs().max().item() < 1e-4, name
    # and back: load_hf reads what save_hf wrote (the Hub layout) into identical logits
    again = load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(again(x), a)


def test_load_checkpoint_written_by_transformers(tmp_path):
    peer = transformers_deepseek(tmp_path / "peer", num_mtp_layers=0)
    ours = load_hf(tmp_path / "peer").eval()
    x = torch.randint(0, 80, (2, 19))
    with torch.no_grad():
        assert (ours(x) - peer(x).logits).abs().max().item() < 1e-4


def test_sharded_checkpoint_round_trip(tmp_path):
    args = make_args()
    ours = make_model(args).eval()
    from anychip.models import save_hf

    save_hf(ours, tmp_path / "hf", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    peer = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
    x = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        ref = ours(x)
        assert (peer(x).logits - ref).abs().max().item() < 1e-4
        assert torch.equal(load_hf(tmp_path / "hf").eval()(x), ref)


def test_bfloat16_save_keeps_router_in_float32(tmp_path):
    from safetensors import safe_open

    from anychip.models import save_hf

    ours = make_model(make_args())
    save_hf(ours, tmp_path / "hf", dtype=torch.bfloat16)
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight").dtype == torch.bfloat16
    loaded = load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    assert loaded.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert loaded.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    bias = ours.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(loaded.layers[1].mlp.gate.e_score_correction_bias, bias)
