"""The op suite: the operations a DeepSeek-V3 training step spends its time and its precision in, on
the shapes of a model preset, each run through anychip's own code where the model has it.

An `OpCase` makes its inputs in float64 on the CPU, says which of them are rounded to the compute dtype
(the rest stay float32, as in training: routing weights, optimizer state), runs on any device, and
counts its work: FLOPs for compute-bound ops, bytes moved for memory-bound ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..models.deepseek.args import ModelArgs
from ..models.deepseek.model import MLA, MLP, Gate, RMSNorm, RoutedExperts, apply_rope

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class Shape:
    """What the preset does not fix: tokens per step on one device, and the sequence length."""

    tokens: int
    seq: int

    @property
    def batch(self) -> int:
        return max(self.tokens // self.seq, 1)


@dataclass(frozen=True)
class OpCase:
    name: str
    what: str  # one line for the report
    dtypes: tuple[torch.dtype, ...]
    make: Callable[[ModelArgs, Shape, torch.Generator], list[torch.Tensor]]  # float64 / int64, CPU
    run: Callable[..., tuple[torch.Tensor, ...]]
    work: Callable[[ModelArgs, Shape, torch.dtype], float]  # FLOPs, or bytes when `unit` is "B"
    unit: str = "FLOP"
    keep_fp32: tuple[int, ...] = ()  # input positions that stay float32 at every dtype
    delta: bool = False  # judge output - input[0] (an update), not the output itself
    routing: bool = False  # outputs: (scores, gate weights, expert indices)


def _randn(gen: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * std


def _meta(cls, *args):
    """A model module without storage: functional_call supplies every tensor it uses."""
    with torch.device("meta"):
        return cls(*args)


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# -- the cases -----------------------------------------------------------------------------------


def _matmul_inputs(a: ModelArgs, s: Shape, g):
    d, i = a.hidden_size, a.intermediate_size
    return [_randn(g, s.tokens, d), _randn(g, 2 * i, d, std=d**-0.5)]


def _softmax_inputs(a: ModelArgs, s: Shape, g):
    return [_randn(g, s.batch, a.num_attention_heads, s.seq, s.seq, std=3.0)]


def _rmsnorm_inputs(a: ModelArgs, s: Shape, g):
    return [_randn(g, s.tokens, a.hidden_size), 1 + _randn(g, a.hidden_size, std=0.1)]


def _rms_norm(x, w, eps):
    return (functional_call(_meta(RMSNorm, x.shape[-1], eps), {"weight": w}, (x,)),)


def _rope_inputs(a: ModelArgs, s: Shape, g):
    d = a.qk_rope_head_dim
    angles = torch.arange(s.seq, dtype=torch.float64)[:, None] / a.rope_theta ** (
        torch.arange(0, d, 2, dtype=torch.float64) / d
    )
    return [_randn(g, s.batch, a.num_attention_heads, s.seq, d), angles.cos()[None], angles.sin()[None]]


def _sdpa_inputs(a: ModelArgs, s: Shape, g):
    shape = (s.batch, a.num_attention_heads, s.seq, a.qk_head_dim)
    return [_randn(g, *shape) for _ in range(4)]  # q, k, v, and the gradient of the output


def _sdpa(q, k, v, grad, scale):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    return out.detach(), dq, dk, dv


def _sdpa_flops(a: ModelArgs, s: Shape, dtype) -> float:
    forward = 4 * s.batch * a.num_attention_heads * s.seq * s.seq * a.qk_head_dim  # q.k and p.v, mask not discounted
    return 3 * forward  # + backward (2x forward)


def _swiglu_inputs(a: ModelArgs, s: Shape, g):
    d, i = a.hidden_size, a.intermediate_size
    return [_randn(g, s.tokens, d), _randn(g, 2 * i, d, std=d**-0.5), _randn(g, d, i, std=i**-0.5)]


def _swiglu(x, w_gate_up, w_down):
    mlp = _meta(MLP, x.shape[-1], w_down.shape[1])
    return (functional_call(mlp, {"gate_up_proj.weight": w_gate_up, "down_proj.weight": w_down}, (x,)),)


def _router_inputs(a: ModelArgs, s: Shape, g):
    d, n = a.hidden_size, a.n_routed_experts
    return [_randn(g, s.tokens, d), _randn(g, n, d, std=d**-0.5), _randn(g, n, std=0.01)]


def _router(args: ModelArgs):
    def run(x, weight, bias):
        gate = _meta(Gate, args)
        weights, indices, scores = functional_call(gate, {"weight": weight, "e_score_correction_bias": bias}, (x,))
        order = indices.argsort(dim=-1)  # top-k order is unspecified: compare gate values expert by expert
        return scores, weights.gather(1, order), indices.gather(1, order)

    return run


def _experts_inputs(a: ModelArgs, s: Shape, g):
    d, i, n, k = a.hidden_size, a.moe_intermediate_size, a.n_routed_experts, a.num_experts_per_tok
    x = _randn(g, s.tokens, d)
    indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(s.tokens)])
    weights = torch.rand(s.tokens, k, generator=g, dtype=torch.float64) * a.routed_scaling_factor / k
    return [x, _randn(g, n, 2 * i, d, std=d**-0.5), _randn(g, n, d, i, std=i**-0.5), indices, weights]


def _experts(args: ModelArgs):
    def run(x, w_gate_up, w_down, indices, weights):
        experts = _meta(RoutedExperts, args)
        counts = torch.bincount(indices.flatten(), minlength=args.n_routed_experts)
        params = {"gate_up_proj": w_gate_up, "down_proj": w_down}
        return (functional_call(experts, params, (x, indices, weights, counts)),)

    return run


def _ce_inputs(a: ModelArgs, s: Shape, g):
    targets = torch.randint(0, a.vocab_size, (s.tokens,), generator=g)
    return [_randn(g, s.tokens, a.vocab_size, std=2.0), targets]


def _cross_entropy(logits, targets):
    logits = logits.detach().requires_grad_()
    loss = F.cross_entropy(logits.float(), targets)  # the model's loss: float32 logits
    (grad,) = torch.autograd.grad(loss, logits)
    return loss.detach(), grad


def _adamw_inputs(a: ModelArgs, s: Shape, g):
    shape = (2 * a.intermediate_size, a.hidden_size)
    grad = _randn(g, *shape, std=1e-2)
    param = _randn(g, *shape, std=0.02)
    exp_avg = grad * 0.5 + _randn(g, *shape, std=1e-3)
    exp_avg_sq = grad**2 * 0.8 + _randn(g, *shape, std=1e-5) ** 2
    return [param, grad, exp_avg, exp_avg_sq]


def _adamw(fused: bool | None):
    def run(param, grad, exp_avg, exp_avg_sq):
        p = param.clone().requires_grad_()
        p.grad = grad.clone()
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8, fused=fused)
        step = torch.tensor(10.0, dtype=torch.float32, device=p.device if fused else "cpu")
        opt.state[p] = {"step": step, "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
        opt.step()
        return (p.detach(),)

    return run


def cases(args: ModelArgs, fused_adamw: bool = False) -> list[OpCase]:
    """The suite for one preset. `fused_adamw`: step AdamW as training does on that device."""
    a = args
    mla_scale = _mla_softmax_scale(a)
    elem = _size
    return [
        OpCase(
            "matmul",
            f"x[T,{a.hidden_size}] @ W^T, W[{2 * a.intermediate_size},{a.hidden_size}] (dense FFN gate/up)",
            (FP32, BF16, FP16),
            _matmul_inputs,
            F.linear,
            lambda a, s, dt: 2 * s.tokens * a.hidden_size * 2 * a.intermediate_size,
        ),
        OpCase(
            "softmax",
            f"over the last dim of [B,{a.num_attention_heads},L,L] attention scores",
            (FP32, BF16),
            _softmax_inputs,
            lambda x: (torch.softmax(x, dim=-1),),
            lambda a, s, dt: 2 * s.batch * a.num_attention_heads * s.seq**2 * elem(dt),
            "B",
        ),
        OpCase(
            "rms_norm",
            f"the model's RMSNorm on [T,{a.hidden_size}]",
            (FP32, BF16),
            _rmsnorm_inputs,
            lambda x, w: _rms_norm(x, w, a.rms_norm_eps),
            lambda a, s, dt: 2 * s.tokens * a.hidden_size * elem(dt),
            "B",
        ),
        OpCase(
            "rope",
            f"apply_rope on [B,{a.num_attention_heads},L,{a.qk_rope_head_dim}] queries",
            (FP32, BF16),
            _rope_inputs,
            lambda x, cos, sin: (apply_rope(x, cos, sin, a.rope_interleave),),
            lambda a, s, dt: 2 * s.tokens * a.num_attention_heads * a.qk_rope_head_dim * elem(dt),
            "B",
        ),
        OpCase(
            "sdpa",
            f"causal scaled_dot_product_attention, forward + backward, head dim {a.qk_head_dim}",
            (FP32, BF16),
            _sdpa_inputs,
            lambda q, k, v, do: _sdpa(q, k, v, do, mla_scale),
            _sdpa_flops,
        ),
        OpCase(
            "swiglu",
            f"the model's SwiGLU FFN, {a.hidden_size} -> {a.intermediate_size} -> {a.hidden_size}",
            (FP32, BF16),
            _swiglu_inputs,
            _swiglu,
            lambda a, s, dt: 6 * s.tokens * a.hidden_size * a.intermediate_size,
        ),
        OpCase(
            "moe_router",
            f"the model's Gate: sigmoid scores, top-{a.num_experts_per_tok} of "
            f"{a.n_routed_experts} experts in the best {a.topk_group} of {a.n_group} groups",
            (FP32, BF16),
            _router_inputs,
            _router(a),
            lambda a, s, dt: 2 * s.tokens * a.hidden_size * a.n_routed_experts,
            keep_fp32=(2,),
            routing=True,
        ),
        OpCase(
            "moe_experts",
            "the model's RoutedExperts: token dispatch (sort by expert), grouped SwiGLU GEMMs, weighted combine",
            (FP32, BF16),
            _experts_inputs,
            _experts(a),
            lambda a, s, dt: 6 * s.tokens * a.num_experts_per_tok * a.hidden_size * a.moe_intermediate_size,
            keep_fp32=(4,),
        ),
        OpCase(
            "cross_entropy",
            f"loss and its gradient over [T,{a.vocab_size}] logits (float32 loss, as the model)",
            (FP32, BF16),
            _ce_inputs,
            _cross_entropy,
            lambda a, s, dt: s.tokens * a.vocab_size * (2 * elem(dt) + 4),
            "B",
        ),
        OpCase(
            "adamw_step",
            f"one AdamW update of a [{2 * a.intermediate_size},{a.hidden_size}] float32 "
            f"parameter ({'fused' if fused_adamw else 'foreach'}, as training on this device)",
            (FP32,),
            _adamw_inputs,
            _adamw(fused_adamw or None),
            lambda a, s, dt: 7 * 4 * 2 * a.intermediate_size * a.hidden_size,
            "B",
            delta=True,
        ),
    ]


def _mla_softmax_scale(a: ModelArgs) -> float:
    with torch.device("meta"):
        return MLA(a).softmax_scale


def expert_agreement(got: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per token: whether the same set of experts was chosen (indices [T, K], any order)."""
    return (got.cpu().sort(dim=-1).values == truth.cpu().sort(dim=-1).values).all(dim=-1)
