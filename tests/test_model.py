"""Behaviour of the DeepSeek-V3 model: KV cache, gradients, balancing, MTP, grouped MoE."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_args, make_model

from anychip.models import KVCache
from anychip.models.deepseek import model as model_lib


@pytest.mark.parametrize("overrides", [{}, dict(q_lora_rank=None, rope_interleave=False, n_group=1, topk_group=1)])
def test_kv_cache_decode_equals_full_forward(overrides):
    args = make_args(**overrides)
    model = make_model(args).eval()
    x = torch.randint(0, args.vocab_size, (3, 24))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(args, batch_size=3, max_len=32)
        pieces = [model(x[:, :7], cache=cache)]  # prefill
        pieces.append(model(x[:, 7:12], cache=cache))  # a chunk on top of a cache
        pieces += [model(x[:, t : t + 1], cache=cache) for t in range(12, 24)]  # token by token
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_a_clear_error():
    args = make_args()
    model = make_model(args).eval()
    cache = KVCache(args, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="KV cache holds 4 tokens"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_left_padding_mask_gives_the_unpadded_logits():
    args = make_args()
    model = make_model(args).eval()
    x = torch.randint(1, args.vocab_size, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 10)], dim=1).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(x)
        out = model(padded, attention_mask=mask, positions=positions)
    torch.testing.assert_close(out[:, 3:], ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_every_parameter_gets_a_gradient():
    args = make_args(num_nextn_predict_layers=2, seq_aux_loss_alpha=0.01, attention_bias=True)
    model = make_model(args).train()
    x = torch.randint(0, args.vocab_size, (4, 32))
    out = model.loss(x, torch.roll(x, -1, dims=1))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    names = {n for n, _ in model.named_parameters()}
    assert not any("e_score_correction_bias" in n for n in names)  # the bias is a buffer, never trained


def test_loss_combines_lm_mtp_and_balance_terms():
    args = make_args(num_nextn_predict_layers=2, mtp_loss_weight=0.3, seq_aux_loss_alpha=0.01)
    model = make_model(args).train()
    x = torch.randint(0, args.vocab_size, (2, 16))
    labels = torch.roll(x, -1, dims=1)
    out = model.loss(x, labels)
    assert len(out.mtp_losses) == 2 and out.balance_loss is not None and out.balance_loss > 0
    expected = out.lm_loss + 0.3 * torch.stack(out.mtp_losses).mean() + out.balance_loss
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(model(x).flatten(0, 1), labels.flatten()))
    # depth 1 predicts t+2 at position t: it must agree with a hand-built forward of the module
    with torch.no_grad():
        h = model.hidden_states(x)[:, :-1]
        cos, sin = model.rope(torch.arange(15).unsqueeze(0), h.dtype)
        h1 = model.mtp[0](h, model.embed_tokens(x[:, 1:]), cos, sin)
        ref = F.cross_entropy(model.lm_head(h1).flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.mtp_losses[0], ref)


def test_mtp_term_trains():
    args = make_args(num_nextn_predict_layers=1, mtp_loss_weight=1.0)
    model = make_model(args).train()
    # counting sequences: the token after next is (token seen by the MTP module) + 1
    start = torch.randint(0, args.vocab_size, (8, 1), generator=torch.Generator().manual_seed(3))
    x = (start + torch.arange(25)) % args.vocab_size
    x, labels = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.loss(x, labels).mtp_losses[0].item()
    for _ in range(60):
        opt.zero_grad()
        model.loss(x, labels).loss.backward()
        opt.step()
    last = model.loss(x, labels).mtp_losses[0].item()
    assert last < 0.5 * first, (first, last)
    # weight 0: MTP modules are skipped, no gradient reaches them
    free = make_model(make_args(num_nextn_predict_layers=1, mtp_loss_weight=0.0)).train()
    out = free.loss(x, labels)
    out.loss.backward()
    assert out.mtp_losses == [] and all(p.grad is None for p in free.mtp.parameters())


def test_sequence_balance_loss_matches_the_paper_formula():
    args = make_args(seq_aux_loss_alpha=0.1, n_group=1, topk_group=1)
    model = make_model(args).train()
    moe = model.layers[1].mlp
    x = torch.randn(2, 5, args.hidden_size)
    moe(x)
    _, idx, s = moe.gate(x.reshape(-1, args.hidden_size))
    n_r, k_r, t = args.n_routed_experts, args.num_experts_per_tok, 5
    expected = 0.0
    for b in range(2):
        rows = slice(b * t, (b + 1) * t)
        s_norm = s[rows] / s[rows].sum(-1, keepdim=True)
        for i in range(n_r):
            f_i = n_r / (k_r * t) * (idx[rows] == i).any(-1).float().sum()
            p_i = s_norm[:, i].mean()
            expected += f_i * p_i
    torch.testing.assert_close(moe.balance_loss, 0.1 * expected / 2)


def _imbalance(load: torch.Tensor) -> float:
    return (load.max() / load.mean()).item()


def test_balancing_bias_moves_skewed_load_toward_uniform():
    args = make_args(n_group=1, topk_group=1, first_k_dense_replace=2, num_hidden_layers=3)
    model = make_model(args, bias_std=0.0).train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (8, 32), generator=gen) for _ in range(4)]
    gate = model.layers[2].mlp.gate
    seen = []
    hook = gate.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(batches[0])
    hook.remove()
    toward = torch.cat(seen).mean(0)
    with torch.no_grad():  # experts 0 and 1 point along the tokens' mean: they win most tokens
        gate.weight[:2] += toward / toward.norm()

    def load_now():
        model.zero_grad()
        for m in model.moe_layers():
            m.expert_load.zero_()
        with torch.no_grad():
            for b in batches:
                model(b)
        return model.expert_loads()[0].clone()

    before = load_now()
    assert _imbalance(before) > 2.0  # skewed to begin with
    params = {n: p.clone() for n, p in model.named_parameters()}
    for _ in range(150):
        with torch.no_grad():
            model(batches[_ % 4])
        model.update_balancing_bias(speed=0.01)
    after = load_now()
    assert _imbalance(after) < 1.4 and _imbalance(after) < 0.6 * _imbalance(before)
    bias = gate.e_score_correction_bias
    assert bias[:2].max() < 0 < bias[2:].max()  # the overloaded experts were pushed down
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # no weight moved


def test_update_uses_given_loads_and_resets_counts():
    args = make_args(n_group=1, topk_group=1)
    model = make_model(args, bias_std=0.0).train()
    model(torch.randint(0, args.vocab_size, (2, 8)))
    assert model.expert_loads().sum() == 2 * 2 * 8 * args.num_experts_per_tok  # two MoE layers
    loads = torch.zeros(2, args.n_routed_experts)
    loads[:, 0] = 10.0  # as if all-reduced from other ranks
    model.update_balancing_bias(loads, speed=0.5)
    assert model.expert_loads().sum() == 0
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias[0].item() == -0.5 and torch.all(bias[1:] == 0.5)


def test_grouped_gemm_and_expert_loop_agree(monkeypatch):
    args = make_args(moe_intermediate_size=16)
    model = make_model(args).train()
    x = torch.randint(0, args.vocab_size, (2, 16))

    def run():
        model.zero_grad()
        loss = model.loss(x, torch.roll(x, -1, 1)).loss
        loss.backward()
        return loss.detach(), model.layers[1].mlp.experts.gate_up_proj.grad.clone()

    monkeypatch.setattr(model_lib, "_USE_GROUPED_MM", True)
    a = run()
    monkeypatch.setattr(model_lib, "_USE_GROUPED_MM", False)
    b = run()
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_routing_respects_groups():
    args = make_args(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = make_model(args).layers[1].mlp.gate
    x = torch.randn(64, args.hidden_size)
    weights, idx, scores = gate(x)
    groups = idx // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups)  # at most topk_group groups per token
    torch.testing.assert_close(weights.sum(-1), torch.full((64,), args.routed_scaling_factor))
    torch.testing.assert_close(weights, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True) * 2.5)
