"""Precision under autocast: the matrix products run in the autocast dtype except the router's,
which stays float32 (routing must not flip on rounding); the residual stream stays float32
even when the parameters are bfloat16; the experts' all-to-all moves the autocast dtype."""

import collections

import torch
import torch.distributed as dist
from conftest import make_args, make_model
from torch.utils._python_dispatch import TorchDispatchMode

from anychip.models import DeepSeekV3, preset
from anychip.models.deepseek.model import RMSNorm, grouped_mm_works

aten = torch.ops.aten


def _mm(a, b, *_):
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(a, b, *_):
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _grouped_mm(a, b, *_):
    """The groups split the rows (2-D x 3-D), the contracted dim (2-D x 2-D: the weight
    gradient) or the columns (3-D x 2-D); 3-D x 3-D is a plain batched product."""
    if a.dim() == 2 and b.dim() == 3:
        return 2 * a.shape[0] * a.shape[1] * b.shape[2]
    if a.dim() == 2:
        return _mm(a, b)
    if b.dim() == 2:
        return 2 * a.shape[1] * a.shape[2] * b.shape[1]
    return _bmm(a, b)


def _attention(q, k, v, *_):
    """q k^T and p v: 2 B H L S (d_qk + d_v) (4 B H L S D when both head sizes are D)."""
    b, h, length, d = q.shape
    return 2 * b * h * length * k.shape[-2] * (d + v.shape[-1])


def _attention_backward(grad, q, k, v, *_):
    return 2 * _attention(q, k, v)  # dq, dk (d_qk each) and dv, dp (d_v each)


# op -> (FLOPs of its arguments, the index of the argument whose dtype it computes in)
MATMULS = {
    aten.mm: (_mm, 0),
    aten.addmm: (lambda bias, a, b, *_: _mm(a, b), 1),
    aten.bmm: (_bmm, 0),
    aten.baddbmm: (lambda c, a, b, *_: _bmm(a, b), 1),
    aten._grouped_mm: (_grouped_mm, 0),
    **{
        op: (_attention, 0)
        for op in (
            aten._scaled_dot_product_flash_attention_for_cpu,
            aten._scaled_dot_product_flash_attention,
            aten._scaled_dot_product_efficient_attention,
            aten._scaled_dot_product_cudnn_attention,
        )
    },
    **{
        op: (_attention_backward, 1)
        for op in (
            aten._scaled_dot_product_flash_attention_for_cpu_backward,
            aten._scaled_dot_product_flash_attention_backward,
            aten._scaled_dot_product_efficient_attention_backward,
            aten._scaled_dot_product_cudnn_attention_backward,
        )
    },
}


class MatmulFlops(TorchDispatchMode):
    """FLOPs of every matrix product (linear layers reach the dispatcher as mm/addmm, einsum as
    bmm), summed by the dtype they compute in; the shapes of the float32 ones."""

    def __init__(self):
        super().__init__()
        self.flops: collections.Counter[torch.dtype] = collections.Counter()
        self.float32_shapes: list[set[tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MATMULS:
            flops, at = MATMULS[func.overloadpacket]
            dtype = args[at].dtype
            self.flops[dtype] += flops(*args)
            if dtype == torch.float32:
                outs = out if isinstance(out, tuple) else (out,)
                tensors = [*args, *outs]
                self.float32_shapes.append({tuple(t.shape) for t in tensors if isinstance(t, torch.Tensor)})
        return out

    def fraction(self, dtype: torch.dtype) -> float:
        return self.flops[dtype] / sum(self.flops.values())


def tiny_step_flops() -> MatmulFlops:
    """Forward + backward of the tiny preset (MTP and a dense layer included) under CPU bf16 autocast."""
    args = preset("tiny")
    torch.manual_seed(0)
    model = DeepSeekV3(args)
    model.init_weights(seed=0)
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):  # the grouped GEMM's one-off probe is not the model's work
        grouped_mm_works(ids.device, dtype)
    with MatmulFlops() as counted:
        with torch.autocast("cpu", torch.bfloat16):
            out = model.loss(ids, ids.roll(-1, dims=1))
        out.loss.backward()
    return counted


def test_under_bf16_autocast_only_the_router_multiplies_in_float32():
    counted = tiny_step_flops()
    args = preset("tiny")
    assert counted.fraction(torch.float32) <= 0.05, dict(counted.flops)
    router = {(args.n_routed_experts, args.hidden_size), (args.hidden_size, args.n_routed_experts)}
    assert counted.float32_shapes  # the router's, forward and backward
    for shapes in counted.float32_shapes:
        assert shapes & router, f"a float32 matrix product that is not the router's: {shapes}"


def test_the_routing_under_bf16_autocast_is_the_float32_routing():
    args = make_args(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    gate = make_model(args).layers[1].mlp.gate
    x = torch.randn(256, args.hidden_size, generator=torch.Generator().manual_seed(0))
    want = gate(x)
    with torch.autocast("cpu", torch.bfloat16):
        got = gate(x)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert torch.equal(g, w)


def test_the_routed_experts_compute_in_the_autocast_dtype_and_return_the_residual_dtype():
    args = make_args()
    moe = make_model(args).layers[1].mlp
    x = torch.randn(2, 5, args.hidden_size, requires_grad=True)
    seen = []
    ffn = moe.experts.ffn
    moe.experts.ffn = lambda rows, counts: seen.append(rows.dtype) or ffn(rows, counts)
    with torch.autocast("cpu", torch.bfloat16):
        y = moe(x)
    y.sum().backward()
    assert seen == [torch.bfloat16]
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert moe.experts.gate_up_proj.grad.dtype == torch.float32  # the parameter's own dtype


def test_the_residual_stream_stays_float32_with_bfloat16_parameters():
    norm = RMSNorm(8, 1e-6).to(torch.bfloat16)
    assert norm(torch.randn(3, 8)).dtype == torch.float32
    model = make_model(make_args(num_nextn_predict_layers=1))
    for p in model.parameters():  # as FSDP2's mixed precision gives them to the forward (not the buffers)
        p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(0, model.args.vocab_size, (2, 7))
    seen = []
    blocks = [*model.layers, *(m.block for m in model.mtp)]
    for block in blocks:
        block.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    with torch.autocast("cpu", torch.bfloat16):
        out = model.loss(ids, ids)
    assert model.mtp and seen == [torch.float32] * len(blocks)
    assert out.loss.dtype == torch.float32


def test_the_expert_all_to_all_moves_the_autocast_dtype_both_ways(tmp_path, monkeypatch):
    """One EP rank of a group of one: every row goes to itself, through the real all-to-all."""
    from torch.distributed.device_mesh import init_device_mesh

    from anychip.models.deepseek.expert_parallel import apply_expert_parallel

    moved = []
    all_to_all = dist.all_to_all_single

    def record(out, x, *args, **kwargs):
        moved.append(x.dtype)
        return all_to_all(out, x, *args, **kwargs)

    monkeypatch.setattr(dist, "all_to_all_single", record)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model = make_model(make_args())
        apply_expert_parallel(model, init_device_mesh("cpu", (1,), mesh_dim_names=("ep",)))
        moe = model.layers[1].mlp
        x = torch.randn(2, 5, model.args.hidden_size, requires_grad=True)
        with torch.autocast("cpu", torch.bfloat16):
            y = moe(x)
        y.sum().backward()
    finally:
        dist.destroy_process_group()
    # the counts (int64), the rows out and back; then the two gradients, in reverse order
    assert moved == [torch.int64, *[torch.bfloat16] * 4]
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
