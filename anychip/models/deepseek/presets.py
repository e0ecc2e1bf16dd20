"""Named sizes. Each preset is a few lines; the published ones match the released configs."""

from __future__ import annotations

import torch

from ...errors import ConfigError
from .args import ModelArgs, YarnScaling
from .model import DeepSeekV3

_V3_YARN = YarnScaling(factor=40, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)

# Not formatted (marker at the end): each preset stays a few dense lines instead of one line per field.
PRESETS: dict[str, ModelArgs] = {
    # unit tests: every part of the architecture, a few tens of thousands of parameters
    "debug": ModelArgs(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64,
        first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, max_position_embeddings=256,
    ),
    # the CPU demo: ~5M parameters (~2.5M active), trains in minutes on 2 cores
    "tiny": ModelArgs(
        vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, q_lora_rank=128,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, intermediate_size=768,
        first_k_dense_replace=1, moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, max_position_embeddings=1024,
    ),
    # DeepSeek-V2-Lite shapes (15.7B total, 2.4B active) with V3 routing
    "v2-lite": ModelArgs(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        intermediate_size=10944, first_k_dense_replace=1, moe_intermediate_size=1408,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=163840,
        rope_scaling=YarnScaling(
            factor=40, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=0.707
        ),
    ),
    # DeepSeek-V3 / R1 (671B total, 37B active, + 14B MTP)
    "v3": ModelArgs(num_nextn_predict_layers=1, max_position_embeddings=163840, rope_scaling=_V3_YARN),
}  # fmt: skip


def preset(name: str, **overrides) -> ModelArgs:
    """The named preset with ``overrides`` applied; unknown names raise ConfigError."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset = {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def count_parameters(args: ModelArgs, include_mtp: bool = False) -> tuple[int, int]:
    """(total, activated per token) parameter counts, computed on the meta device.

    Activated counts the weights a token's forward pass multiplies with, the convention
    behind DeepSeek's published figures: attention, dense FFNs, shared experts, K_r of
    the N_r routed experts of each MoE layer, norms and the output head. The embedding
    table is a lookup (one row per token) and is not counted.
    """
    with torch.device("meta"):
        model = DeepSeekV3(args if include_mtp else args.replace(num_nextn_predict_layers=0))
    total = sum(p.numel() for p in model.parameters())
    idle = model.embed_tokens.weight.numel() if not args.tie_word_embeddings else 0
    for m in model.moe_layers():
        per_expert = sum(p[0].numel() for p in m.experts.parameters())
        idle += per_expert * (args.n_routed_experts - args.num_experts_per_tok)
    return total, total - idle


def training_flops_per_token(args: ModelArgs, seq_len: int) -> tuple[float, float, float]:
    """Training (forward + backward) FLOPs per token: (total, 6N term, attention term).

    6N: 6 x activated non-embedding parameters (MTP modules included when the args have
    them): 2 FLOPs per multiply-add forward, 4 backward. Attention: q.k over ``seq_len``
    keys and p.v, forward + backward, per layer and head; as in PaLM's MFU the causal
    mask is not discounted.
    """
    _, active = count_parameters(args, include_mtp=True)
    layers = args.num_hidden_layers + args.num_nextn_predict_layers
    dense = 6.0 * active
    attn = 6.0 * layers * seq_len * args.num_attention_heads * (args.qk_head_dim + args.v_head_dim)
    return dense + attn, dense, attn
