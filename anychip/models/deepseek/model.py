"""DeepSeek-V3, one box of the paper per class (arXiv:2412.19437).

    MLA       Multi-head Latent Attention, eqs. (1)-(11)
    Gate      sigmoid affinities, group-limited top-K with the balancing bias, eqs. (15)-(16)
    MoE       shared + routed experts, eq. (12); sequence-wise balance loss, eqs. (17)-(20)
    MTP       multi-token prediction modules, eqs. (21)-(25)

The module and parameter names are those of the Hugging Face checkpoints, except that
the gate and up projections of every SwiGLU are stored as one matrix (``gate_up_proj``)
and the routed experts of a layer as one stacked tensor; ``hf.py`` maps between the two.
The file holds no distributed code: parallelism is applied from outside.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs, YarnScaling
from .init import init_parameters


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, then cast back (as the reference implementation)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one fused kernel, same math
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * y.to(x.dtype)


# ---------------------------------------------------------------------------- RoPE


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_inv_freq(dim: int, theta: float, yarn: YarnScaling | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary pairs, and the factor applied to cos/sin.

    With YaRN, low-frequency dimensions are interpolated by ``factor``, high-frequency
    ones kept, with a linear ramp between the ``beta_fast``/``beta_slow`` rotation counts.
    """
    base = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if yarn is None:
        return 1.0 / base, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(correction_dim(yarn.beta_slow)), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)
    keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (keep the frequency), 0: interpolate
    inv_freq = (1.0 / (yarn.factor * base)) * (1 - keep) + (1.0 / base) * keep
    if yarn.mscale and yarn.mscale_all_dim:
        attention_factor = yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(yarn.factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin of the decoupled RoPE key/query dims (d_h^R) for given positions."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self._inv_freq: torch.Tensor | None = None  # plain attribute: never a meta or stale tensor

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            inv_freq, self.attention_factor = rope_inv_freq(
                self.args.qk_rope_head_dim, self.args.rope_theta, self.args.rope_scaling
            )
            self._inv_freq = inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self._inv_freq
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [B, H, L, d_h^R] by the position angles (cos/sin [B or 1, L, d_h^R/2]).

    With ``interleave`` the pairs are (x0, x1), (x2, x3), ... as in DeepSeek's weights;
    the result is written de-interleaved, which leaves q·k unchanged because queries
    and keys get the same permutation.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------- attention


class KVCache:
    """MLA's compressed cache for incremental decoding: per layer, the latent c^{KV}
    [B, S, d_c] and the rotated shared key k^R [B, S, d_h^R] (eqs. 1, 3), not full keys."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        n = args.num_hidden_layers
        self.latent = torch.zeros(n, batch_size, max_len, args.kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(n, batch_size, max_len, args.qk_rope_head_dim, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    @property
    def max_len(self) -> int:
        return self.latent.shape[2]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows ``rows`` (sequences that finished leave the batch)."""
        self.latent = self.latent[:, rows]
        self.k_rope = self.k_rope[:, rows]

    def update(self, layer: int, latent: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + latent.shape[1]
        self.latent[layer, :, self.pos : end] = latent
        self.k_rope[layer, :, self.pos : end] = k_rope
        return self.latent[layer, :, :end], self.k_rope[layer, :, :end]


class MLA(nn.Module):
    """Multi-head Latent Attention.

    c^Q = W^{DQ} h             q_a_proj, q_a_layernorm        (eq. 6)
    [q^C; q^R] = W^{UQ}, W^{QR} c^Q     q_b_proj (or q_proj)   (eqs. 7-8)
    [c^{KV}; k^R] = W^{DKV}, W^{KR} h   kv_a_proj_with_mqa     (eqs. 1, 3)
    [k^C; v^C] = W^{UK}, W^{UV} c^{KV}  kv_b_proj              (eqs. 2, 5)
    u = W^O softmax(q k / sqrt(d_h + d_h^R)) v                 (eqs. 10-11)
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        d, n_h = args.hidden_size, args.num_attention_heads
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(d, n_h * args.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(args.q_lora_rank, n_h * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, args.kv_lora_rank + args.qk_rope_head_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(args.kv_lora_rank, n_h * (args.qk_nope_head_dim + args.v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_h * args.v_head_dim, d, bias=args.attention_bias)
        self.softmax_scale = args.qk_head_dim**-0.5
        if args.rope_scaling is not None and args.rope_scaling.mscale_all_dim:
            m = yarn_mscale(args.rope_scaling.factor, args.rope_scaling.mscale_all_dim)
            self.softmax_scale *= m * m

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer_id: int = 0):
        a = self.args
        bsz, seqlen, _ = x.shape
        n_h = a.num_attention_heads
        if a.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(bsz, seqlen, n_h, a.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, cos, sin, a.rope_interleave)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin, a.rope_interleave).squeeze(1)
        if cache is not None:
            decoding = cache.pos > 0
            latent, k_rope = cache.update(layer_id, latent, k_rope)
            if decoding:
                o = self._absorbed(q_nope, q_rope, latent, k_rope, mask)
                return self.o_proj(o.transpose(1, 2).reshape(bsz, seqlen, n_h * a.v_head_dim))
        kv = self.kv_b_proj(latent).view(bsz, latent.shape[1], n_h, -1).transpose(1, 2)
        k_nope, v = kv.split([a.qk_nope_head_dim, a.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(1).expand(-1, n_h, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        # no test of seqlen here: one query against one key is the same either way, and under compile
        # with dynamic shapes the test would be a symbolic bool, which SDPA refuses (a graph break)
        causal = mask is None and (cache is None or cache.pos == 0)
        if a.v_head_dim < a.qk_head_dim:
            # fused attention kernels want one head size for q, k and v: pad v with zeros, drop after
            v = F.pad(v, (0, a.qk_head_dim - a.v_head_dim))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale)
        o = o[..., : a.v_head_dim]
        return self.o_proj(o.transpose(1, 2).reshape(bsz, seqlen, n_h * a.v_head_dim))

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Attention over the cached latent without expanding it into per-head keys and
        values (decoding): W^{UK} is absorbed into the query and W^{UV} applied after the
        weighted sum, so each step costs O(cached tokens x d_c) instead of re-projecting the
        whole cache. Same result as the expanded path up to rounding."""
        a = self.args
        w = self.kv_b_proj.weight.view(a.num_attention_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
        w_uk, w_uv = w[:, : a.qk_nope_head_dim], w[:, a.qk_nope_head_dim :]
        bsz, n_h, seqlen, _ = q_nope.shape
        q_latent = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # [B, H, L, d_c]
        # heads folded into the query rows: one batched GEMM per sequence against the cache
        # as it lies in memory (broadcasting the cache over heads would copy it H times)
        scores = torch.bmm(q_latent.reshape(bsz, n_h * seqlen, -1), latent.transpose(1, 2))
        scores = scores + torch.bmm(q_rope.reshape(bsz, n_h * seqlen, -1), k_rope.transpose(1, 2))
        scores = scores.view(bsz, n_h, seqlen, -1).float() * self.softmax_scale  # [B, H, L, S]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(latent.dtype).view(bsz, n_h * seqlen, -1)
        o_latent = torch.bmm(p, latent).view(bsz, n_h, seqlen, -1)
        return torch.einsum("bhtc,hvc->bhtv", o_latent, w_uv)  # [B, H, L, d_v]


# ---------------------------------------------------------------------------- FFN


class MLP(nn.Module):
    """SwiGLU FFN: W_down (silu(W_gate x) * W_up x), gate and up stored as one matrix."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on ``device_type``; None where autocast is
    off, or does not exist (the meta device)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str):
    """A region without autocast on ``device_type`` (nothing to do where it is off already)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class Gate(nn.Module):
    """Routing of DeepSeekMoE (eqs. 13-16).

    s_{i,t} = sigmoid(u_t^T e_i); experts are chosen by s_{i,t} + b_i, restricted to the
    ``topk_group`` best of ``n_group`` groups (a group scores the sum of its top 2);
    the gate values g_{i,t} use s_{i,t} without the bias, optionally normalised over the
    chosen K_r, then scaled by ``routed_scaling_factor``. The bias b
    (``e_score_correction_bias``) is a buffer: gradients never touch it.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, d] -> gate values [T, K_r] (float32), expert indices [T, K_r], scores s [T, N_r]."""
        a = self.args
        # the choice compares scores: in float32 even under autocast, whose bf16 product would
        # round near-equal experts' scores together and flip routing
        with autocast_off(x.device.type):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if a.n_group > 1:
            grouped = choice.view(-1, a.n_group, a.n_routed_experts // a.n_group)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            top_groups = group_scores.topk(a.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        indices = choice.topk(a.num_experts_per_tok, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * a.routed_scaling_factor, indices, scores


def grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM exists on some devices and dtypes only: probe once (forward
    and backward; with autograd on even when the first MoE forward runs under no_grad). An
    activation checkpoint must not wrap the first call: parallelize.py probes before it."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        try:
            with torch.enable_grad():
                x = torch.ones(4, 16, device=device, dtype=dtype, requires_grad=True)
                w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([1, 4], device=device, dtype=torch.int32)
                y = F.grouped_mm(x, w, offs=offs)
                y.backward(torch.ones_like(y))
            _GROUPED_MM_OK[key] = bool(torch.allclose(y.detach().float(), torch.full_like(y, 16).float()))
        except Exception:  # not implemented for this device/dtype: use the loop
            _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}
_USE_GROUPED_MM = hasattr(F, "grouped_mm")


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects broadcast (stride-0) gradients
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [T, in] sorted by expert, w [E, out, in], counts [E] -> [T, out]: x_e @ w_e^T per expert."""
    w = w.to(x.dtype)  # as F.linear under autocast: compute in the activations' dtype
    if torch.compiler.is_compiling():  # one opaque op: the compiler cannot trace grouped_mm in float32
        return compiled_grouped_linear(x, w, counts, offsets)
    aligned = (w.shape[1] * x.element_size()) % 16 == 0 and (w.shape[2] * x.element_size()) % 16 == 0
    if _USE_GROUPED_MM and aligned and grouped_mm_works(x.device, x.dtype):
        return _contiguous_grad(F.grouped_mm(x, w.transpose(-2, -1), offs=offsets))
    outs = [F.linear(chunk, w[e]) for e, chunk in enumerate(x.split(counts.tolist())) if chunk.shape[0]]
    # no rows: still an output of x and w (under expert parallelism its peers' backward waits on it)
    return torch.cat(outs) if outs else F.linear(x, w[0])


@torch.library.custom_op("anychip::grouped_linear", mutates_args=())
def compiled_grouped_linear(
    x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """``grouped_linear`` as one operator for torch.compile (which runs it as it is)."""
    return grouped_linear(x, w, counts, offsets)


@compiled_grouped_linear.register_fake
def _grouped_linear_shape(x, w, counts, offsets):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("anychip::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(
    grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx_e = g_e w_e and dL/dw_e = g_e^T x_e per expert."""
    grad_x, grad_w = torch.empty_like(x), torch.zeros_like(w)
    start = 0
    for e, n in enumerate(counts.tolist()):
        g = grad[start : start + n]
        grad_x[start : start + n] = g @ w[e]
        grad_w[e] = g.t() @ x[start : start + n]
        start += n
    return grad_x, grad_w


@grouped_linear_backward.register_fake
def _grouped_linear_backward_shape(grad, x, w, counts):
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _grouped_linear_setup(ctx, inputs, output):
    x, w, counts, _ = inputs
    ctx.save_for_backward(x, w, counts)


def _grouped_linear_grad(ctx, grad):
    x, w, counts = ctx.saved_tensors
    grad_x, grad_w = grouped_linear_backward(grad.contiguous(), x, w, counts)
    return grad_x, grad_w, None, None


compiled_grouped_linear.register_autograd(_grouped_linear_grad, setup_context=_grouped_linear_setup)


class RoutedExperts(nn.Module):
    """N_r SwiGLU experts held as stacked weights; tokens are sorted by expert and each
    expert's rows go through one GEMM (torch's grouped GEMM where available)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        e, d, i = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor):
        """x [T, d], indices/weights [T, K_r], counts [N_r] (tokens per expert) -> [T, d]."""
        k = indices.shape[1]
        order = indices.flatten().argsort(stable=True)
        token = order // k
        # torch has no autocast rule for the grouped GEMM: without this cast it would run in the
        # residual stream's float32. Cast before the gather (K_r times fewer rows) and before expert
        # parallelism's all-to-all, which then moves (and returns gradients in) the autocast dtype
        dtype = autocast_dtype(x.device.type)
        rows = x if dtype is None else x.to(dtype)
        h = self.ffn(rows[token], counts)
        h = (h.float() * weights.flatten()[order, None]).to(x.dtype)  # g_{i,t} in float32, summed in x's dtype
        return torch.zeros_like(x).index_add_(0, token, h)

    def ffn(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [T*K_r, d] sorted by expert, counts [N_r] -> each row through its expert's SwiGLU.
        Expert parallelism replaces it per instance (``expert_parallel.py``)."""
        return swiglu_experts(x, self.gate_up_proj, self.down_proj, counts)


def swiglu_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, ``counts[e]`` rows for expert e of the stacked weights."""
    offsets = counts.cumsum(0).to(torch.int32)
    h = grouped_linear(x, gate_up, counts, offsets)
    gate, up = h.chunk(2, dim=-1)
    return grouped_linear(F.silu(gate) * up, down, counts, offsets)


class MoE(nn.Module):
    """DeepSeekMoE: h' = u + sum_i FFN_i^(s)(u) + sum_i g_{i,t} FFN_i^(r)(u)  (eq. 12).

    In training mode it counts the tokens sent to each expert (``expert_load``) for the
    auxiliary-loss-free bias update, and with alpha > 0 computes the sequence-wise
    balance loss L_Bal (``balance_loss``), read by the model after the forward pass.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = RoutedExperts(args)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts) if args.n_shared_experts else None
        )
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts), persistent=False)
        self.balance_loss: torch.Tensor | None = None
        # this forward's tokens per expert; the model adds them to ``expert_load`` after its own forward,
        # outside any checkpointed or compiled block, so a recomputation of the block counts nothing twice
        self.routed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, with_stats: bool = False):
        """x [B, L, d] -> [B, L, d]. With ``with_stats``: (output, tokens per expert [N_r], L_Bal or
        None), and nothing is kept on the module (``keep_stats`` does that): a side-effect-free
        forward for activation checkpointing, whose recomputation runs it again."""
        a = self.args
        bsz, seqlen, d = x.shape
        flat = x.reshape(-1, d)
        weights, indices, scores = self.gate(flat)
        flat_idx = indices.flatten()  # tokens per expert; a fixed-size scatter (bincount's size depends on the data)
        counts = torch.zeros(a.n_routed_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_idx, torch.ones_like(flat_idx)
        )
        balance = None
        if self.training and a.seq_aux_loss_alpha:
            balance = self.sequence_balance_loss(scores, indices, bsz)
        y = self.experts(flat, indices, weights, counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        y = y.view(bsz, seqlen, d)
        if with_stats:
            return y, counts, balance
        self.keep_stats(counts, balance)
        return y

    def keep_stats(self, counts: torch.Tensor, balance: torch.Tensor | None) -> None:
        """Keep a forward's statistics for the model to read after its forward pass."""
        self.balance_loss = balance
        if self.training:
            self.routed = counts

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, bsz: int) -> torch.Tensor:
        """L_Bal = alpha * sum_i f_i P_i per sequence, averaged over the batch (eqs. 17-20)."""
        a = self.args
        n_r, k_r = a.n_routed_experts, a.num_experts_per_tok
        scores = scores.view(bsz, -1, n_r)
        seqlen = scores.shape[1]
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # P_i
        hits = torch.zeros(bsz, n_r, device=scores.device).scatter_add_(
            1, indices.reshape(bsz, -1), torch.ones(bsz, seqlen * k_r, device=scores.device)
        )
        f = hits * n_r / (k_r * seqlen)  # f_i
        return a.seq_aux_loss_alpha * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, speed: float, load: torch.Tensor | None = None) -> None:
        """b_i += gamma * sign(mean load - load_i), then reset the counts.

        ``load`` overrides the local counts (pass the all-reduced load under data parallel).
        """
        load = self.expert_load if load is None else load.to(self.expert_load)
        bias = self.gate.e_score_correction_bias
        bias += speed * torch.sign(load.mean() - load).to(bias)
        self.expert_load.zero_()


class Block(nn.Module):
    """Pre-norm transformer layer: h = h + MLA(norm(h)); h = h + FFN(norm(h))."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.self_attn = MLA(args)
        self.mlp = MoE(args) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer_id)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_with_stats(self, x, cos, sin, mask=None, cache=None):
        """``forward`` without side effects, for activation checkpointing (whose recomputation runs
        it again, and whose compiled form refuses a mutation inside the checkpointed region):
        (output, the MoE layer's (tokens per expert, L_Bal or None), or None for a dense layer)."""
        if not isinstance(self.mlp, MoE):
            return Block.forward(self, x, cos, sin, mask, cache), None  # (``forward`` may be replaced)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, self.layer_id)
        y, counts, balance = self.mlp(self.post_attention_layernorm(x), with_stats=True)
        return x + y, (counts, balance)


class MTP(nn.Module):
    """One multi-token prediction module (eqs. 21-22):
    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})],  h^k = TRM_k(h'^k).
    Embedding and output head are the main model's; ``shared_head.norm`` is this
    module's final norm before the shared head."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.enorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.hnorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)  # M_k
        self.block = Block(args, layer_id)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h_prev, emb, cos, sin):
        h = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h_prev)), dim=-1))
        h = h.to(h_prev.dtype)  # this module's residual stream, in the main one's dtype (not autocast's)
        return self.shared_head.norm(self.block(h, cos, sin))


@dataclass
class LossOutput:
    loss: torch.Tensor | None  # what to back-propagate: lm + lambda * mean(mtp) + balance (mean reduction)
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor]  # one per depth k
    balance_loss: torch.Tensor | None
    num_tokens: torch.Tensor  # label tokens counted in lm_loss
    mtp_tokens: list[torch.Tensor]  # label tokens counted in each MTP loss


class DeepSeekV3(nn.Module):
    """Embedding -> L blocks -> RMSNorm -> output head, plus D MTP modules for training."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTP(args, args.num_hidden_layers + k) for k in range(args.num_nextn_predict_layers))
        self.rope = RotaryEmbedding(args)

    # -- initialisation --------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, prefix: str = "") -> None:
        """Normal(0, initializer_range) matrices, unit norms, zero biases and balancing bias;
        only of the parameters and MoE layers whose names start with ``prefix`` (e.g. "mtp."
        for MTP modules a checkpoint lacks). Sharded parameters (FSDP2, expert parallelism)
        get their shards of the values one process would hold (``init.py``)."""
        init_parameters(self, seed, self.args.initializer_range, prefix)
        self.reset_buffers(prefix)

    @torch.no_grad()
    def reset_buffers(self, prefix: str = "") -> None:
        """Zero the balancing biases and expert-load counters (after meta init or to_empty) of
        the MoE layers whose names start with ``prefix``."""
        for name, m in self.named_modules():
            if isinstance(m, MoE) and name.startswith(prefix):
                m.gate.e_score_correction_bias.zero_()
                m.expert_load.zero_()

    @torch.no_grad()
    def clear_expert_loads(self) -> None:
        """Forget the tokens counted since the last bias update (a step that is dropped)."""
        for m in self.moe_layers():
            m.expert_load.zero_()

    def materialize_counters(self) -> None:
        """Give the expert-load counters (not in the state dict) real zeros on the
        device of the weights, e.g. after ``load_state_dict(..., assign=True)`` on meta."""
        for m in self.moe_layers():
            m.expert_load = torch.zeros_like(m.expert_load, device=m.gate.weight.device)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def moe_layer_names(self) -> list[str]:
        """The blocks that hold the MoE layers, in ``moe_layers()`` order ("layers.1", ..., "mtp.0.block")."""
        return [name.removesuffix(".mlp") for name, m in self.named_modules() if isinstance(m, MoE)]

    # -- forward ---------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, the residual stream's first term: float32 when the table is in a lower
        precision under autocast (FSDP2's bf16 parameters in the forward), so that every block adds
        to a float32 sum; as the table is otherwise (float32, float64, or a bf16 model run without
        autocast, whose layers could not take float32 inputs)."""
        h = self.embed_tokens(input_ids)
        if h.is_floating_point() and torch.finfo(h.dtype).bits < 32 and autocast_dtype(h.device.type) is not None:
            return h.float()
        return h

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, L, d] of the main model.

        ``attention_mask`` [B, S] (1 = real token) covers every key position, cached ones
        included; ``positions`` [B, L] defaults to the cache offset + arange(L).
        """
        bsz, seqlen = input_ids.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and start + seqlen > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {start} cached + {seqlen} new do not fit")
        if positions is None:
            positions = torch.arange(start, start + seqlen, device=input_ids.device).unsqueeze(0)
        h = self.embed(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        mask = self._attention_mask(bsz, seqlen, start, attention_mask, input_ids.device)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.pos += seqlen
        return self.norm(h)

    @staticmethod
    def _attention_mask(bsz, seqlen, start, attention_mask, device):
        if attention_mask is None and (start == 0 or seqlen == 1):
            return None  # plain causal (SDPA's is_causal) or a single query that sees everything
        q_pos = torch.arange(start, start + seqlen, device=device)
        k_pos = torch.arange(start + seqlen, device=device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [L, S]
        if attention_mask is None:
            return mask
        if attention_mask.shape != (bsz, start + seqlen):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(bsz, start + seqlen)}"
            )
        mask = mask & attention_mask.bool()[:, None, :]
        # a padding query with no visible key would give NaN: let it see itself
        mask = mask | (k_pos[None, :] == q_pos[:, None])
        return mask.unsqueeze(1)  # [B, 1, L, S]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> torch.Tensor | LossOutput:
        """input_ids [B, L] -> logits [B, L, vocab]; with ``labels``, the training losses
        (see ``loss``). Going through ``forward`` keeps FSDP/DDP hooks in the path."""
        if labels is not None:
            out = self._loss(input_ids, labels, ignore_index, reduction)
        else:
            out = self.lm_head(self.hidden_states(input_ids, cache, attention_mask, positions))
        self._count_routed()
        return out

    @torch.no_grad()
    def _count_routed(self) -> None:
        for m in self.moe_layers():
            if m.routed is not None:
                m.expert_load += m.routed.to(m.expert_load.dtype)
                m.routed = None

    def loss(self, input_ids, labels, ignore_index: int = -100, reduction: str = "mean") -> LossOutput:
        """Next-token cross-entropy on ``labels`` (already shifted: labels[t] is the token
        after input_ids[t]; ``ignore_index`` masks), plus the MTP losses (eq. 25, weight
        lambda; depth k at position i predicts labels[i + k]) and the sequence-wise
        balance loss (alpha) when enabled.

        ``reduction="mean"``: ``loss`` = lm + lambda * mean_k(mtp_k) + balance, each a
        mean over its tokens. ``reduction="sum"``: lm and MTP terms are sums and
        ``loss`` is None; the caller normalises by token counts gathered over
        micro-batches and ranks (``num_tokens``, ``mtp_tokens``)."""
        return self(input_ids, labels=labels, ignore_index=ignore_index, reduction=reduction)

    def _loss(self, input_ids, labels, ignore_index, reduction) -> LossOutput:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction = {reduction!r}; expected 'mean' or 'sum'")

        def ce(h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.lm_head(h).flatten(0, 1).float()
            total = F.cross_entropy(logits, target.flatten(), ignore_index=ignore_index, reduction="sum")
            return total, (target != ignore_index).sum()

        h = self.hidden_states(input_ids)
        lm_loss, n_tok = ce(h, labels)
        mtp_losses, mtp_tokens = [], []
        if self.mtp and self.args.mtp_loss_weight:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            for k, module in enumerate(self.mtp, start=1):
                if input_ids.shape[1] <= k:
                    break
                # depth k at position i sees t_{i+k} and predicts t_{i+k+1} = labels[i+k]
                h = h[:, :-1]
                cos, sin = self.rope(positions[:, : h.shape[1]], h.dtype)
                h = module(h, self.embed(input_ids[:, k:]), cos, sin)
                total, count = ce(h, labels[:, k:])
                mtp_losses.append(total)
                mtp_tokens.append(count)
        balance = [m.balance_loss for m in self.moe_layers() if m.balance_loss is not None]
        balance_loss = torch.stack(balance).sum() if balance else None
        loss = None
        if reduction == "mean":
            lm_loss = lm_loss / n_tok.clamp(min=1)
            mtp_losses = [t / c.clamp(min=1) for t, c in zip(mtp_losses, mtp_tokens)]
            loss = lm_loss
            if mtp_losses:
                loss = loss + self.args.mtp_loss_weight * torch.stack(mtp_losses).mean()
            if balance_loss is not None:
                loss = loss + balance_loss
        return LossOutput(loss, lm_loss, mtp_losses, balance_loss, n_tok, mtp_tokens)

    # -- auxiliary-loss-free load balancing -----------------------------------------

    def expert_loads(self) -> torch.Tensor:
        """Tokens routed to each expert since the last update, [n_moe_layers, N_r]."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, self.args.n_routed_experts)
        return torch.stack([m.expert_load for m in layers])

    def update_balancing_bias(self, loads: torch.Tensor | None = None, speed: float | None = None) -> None:
        """Apply b_i += gamma * sign(mean load - load_i) in every MoE layer and reset the
        counts. ``loads`` [n_moe_layers, N_r] replaces the local counts (e.g. all-reduced
        over data-parallel ranks); ``speed`` defaults to ``args.bias_update_speed``."""
        speed = self.args.bias_update_speed if speed is None else speed
        for i, m in enumerate(self.moe_layers()):
            m.update_bias(speed, None if loads is None else loads[i])
