"""Shape and routing hyper-parameters of the DeepSeek-V3 family.

Field names are those of the DeepSeek-V3 paper and of the Hugging Face
``config.json`` (``q_lora_rank``, ``kv_lora_rank``, ``qk_rope_head_dim``, ...), so a
config file maps onto this dataclass almost one to one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...errors import ConfigError

# ModelArgs fields that change no tensor shape: a resume, or a run started from another
# model (``model.init_from``), may set them
SHAPE_FREE = frozenset({"mtp_loss_weight", "seq_aux_loss_alpha", "bias_update_speed", "initializer_range", "hf_extra"})


@dataclass(frozen=True)
class YarnScaling:
    """YaRN context extension of RoPE (DeepSeek-V2 §B.2, Peng et al. 2023)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelArgs:
    # vocabulary and trunk
    vocab_size: int = 129280
    hidden_size: int = 7168  # d
    num_hidden_layers: int = 61
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Multi-head Latent Attention
    num_attention_heads: int = 128  # n_h
    q_lora_rank: int | None = 1536  # d_c' (None: queries are not compressed)
    kv_lora_rank: int = 512  # d_c
    qk_nope_head_dim: int = 128  # d_h
    qk_rope_head_dim: int = 64  # d_h^R
    v_head_dim: int = 128
    attention_bias: bool = False
    # RoPE
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    rope_scaling: YarnScaling | None = None
    # FFN: dense SwiGLU for the first layers, DeepSeekMoE after
    intermediate_size: int = 18432
    first_k_dense_replace: int = 3
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256  # N_r
    n_shared_experts: int = 1  # N_s
    num_experts_per_tok: int = 8  # K_r
    n_group: int = 8  # M groups of experts
    topk_group: int = 4  # groups kept per token
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # Multi-token prediction (D modules)
    num_nextn_predict_layers: int = 0
    # Training-time terms: not part of the architecture, not written to config.json.
    mtp_loss_weight: float = 0.3  # lambda
    seq_aux_loss_alpha: float = 0.0  # alpha, sequence-wise balance loss
    bias_update_speed: float = 0.001  # gamma, auxiliary-loss-free balancing
    # Extra config.json fields kept for the round trip (token ids, ...).
    hf_extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        positive = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "v_head_dim",
            "max_position_embeddings",
            "intermediate_size",
        ]
        for name in positive:
            _require(self, name, getattr(self, name) > 0, "a positive integer")
        _require(self, "qk_nope_head_dim", self.qk_nope_head_dim >= 0, "an integer >= 0")
        _require(self, "qk_rope_head_dim", self.qk_rope_head_dim % 2 == 0, "an even number (RoPE pairs)")
        _require(self, "q_lora_rank", self.q_lora_rank is None or self.q_lora_rank > 0, "None or > 0")
        _require(self, "rope_theta", self.rope_theta > 0, "> 0")
        _require(self, "rms_norm_eps", self.rms_norm_eps > 0, "> 0")
        _require(self, "first_k_dense_replace", self.first_k_dense_replace >= 0, "an integer >= 0")
        _require(self, "num_nextn_predict_layers", self.num_nextn_predict_layers >= 0, "an integer >= 0")
        _require(self, "seq_aux_loss_alpha", self.seq_aux_loss_alpha >= 0, ">= 0")
        _require(self, "mtp_loss_weight", self.mtp_loss_weight >= 0, ">= 0")
        _require(self, "bias_update_speed", self.bias_update_speed >= 0, ">= 0")
        if self.has_moe:
            for name in ["moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group"]:
                _require(self, name, getattr(self, name) > 0, "a positive integer")
            _require(self, "n_shared_experts", self.n_shared_experts >= 0, "an integer >= 0")
            divides = self.n_routed_experts % self.n_group == 0
            _require(self, "n_group", divides, f"a divisor of n_routed_experts={self.n_routed_experts}")
            _require(self, "topk_group", 1 <= self.topk_group <= self.n_group, f"in [1, n_group={self.n_group}]")
            reachable = self.topk_group * (self.n_routed_experts // self.n_group)
            within_reach = self.num_experts_per_tok <= reachable
            _require(self, "num_experts_per_tok", within_reach, f"<= topk_group * experts per group = {reachable}")
            groups_of_two = self.n_group == 1 or self.n_routed_experts // self.n_group >= 2
            expected = "1, or small enough that each group holds >= 2 experts (groups are scored by their top 2)"
            _require(self, "n_group", groups_of_two, expected)
        if self.rope_scaling is not None:
            s = self.rope_scaling
            _require(self, "rope_scaling.factor", s.factor >= 1, ">= 1")
            original_positive = s.original_max_position_embeddings > 0
            _require(self, "rope_scaling.original_max_position_embeddings", original_positive, "> 0")

    # derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace

    def replace(self, **changes) -> ModelArgs:
        """A copy with ``changes`` applied; unknown names raise ConfigError."""
        names = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in names:
                raise ConfigError(f"model: unknown key {key!r}; known keys: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)


def _require(args: ModelArgs, name: str, ok: bool, expected: str) -> None:
    if not ok:
        value = args
        for part in name.split("."):
            value = getattr(value, part)
        raise ConfigError(f"model.{name} = {value!r} is invalid: expected {expected}")
