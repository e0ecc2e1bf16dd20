"""GRPO-family losses and advantages equal TRL's GRPOTrainer on the same log-probs, masks and rewards.

TRL's own code runs here: ``GRPOTrainer._compute_loss`` is called unbound on a stand-in object that has
only the attributes it reads, with ``_get_per_token_logps_and_entropies`` returning the given log-probs.
The advantage computation is inline in TRL's ``_generate_and_score_completions`` (no function of its own),
so its source block is cut out of that method and executed on given rewards.
"""

import inspect
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo.GRPOTrainer

from anychip.rl.losses import LOSS_TYPES, group_advantages, normalise, per_token_loss, policy_loss  # noqa: E402

TOL = 1e-6
EPS_LOW, EPS_HIGH = 0.2, 0.28  # asymmetric (DAPO's clip-higher)
B, T, G = 6, 9, 3  # sequences, completion length, group size
LENGTHS = [9, 4, 7, 1, 6, 0]  # completion tokens per sequence; one empty sequence


class _OneProcess:
    """accelerate.Accelerator as TRL's loss uses it, for a single process."""

    num_processes = 1

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    old = logp + 0.35 * torch.randn(B, T, generator=g, dtype=torch.float64)  # ratios well outside [0.8, 1.28]
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.0], dtype=torch.float64)
    adv = group_advantages(rewards, G)
    return logp, old, ref, mask, adv


def trl_loss(
    logp,
    old,
    adv,
    mask,
    *,
    loss_type,
    beta=0.0,
    ref=None,
    level="token",
    max_len=None,
    eps_low=EPS_LOW,
    eps_high=EPS_HIGH,
    num_items=None,
    accumulation=1,
):
    """TRL's loss (and its logged metrics) with the given per-token log-probs in place of a model's."""
    logp = logp.detach().clone().requires_grad_(True)
    b, t = logp.shape
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation,
        max_completion_length=t if max_len is None else max_len,
        accelerator=_OneProcess(),
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum() if num_items is None else torch.tensor(num_items),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, logp)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grad, metrics


def ours(logp, old, adv, mask, **kw):
    logp = logp.detach().clone().requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, eps_low=EPS_LOW, eps_high=EPS_HIGH, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, stats


CASES = [
    (loss_type, level, beta)
    for loss_type in LOSS_TYPES
    for level in ("token", "sequence")  # "sequence" is GSPO (TRL's importance_sampling_level="sequence")
    for beta in (0.0, 0.04)
]


@pytest.mark.parametrize("loss_type,level,beta", CASES)
def test_policy_loss_matches_trl(loss_type, level, beta):
    logp, old, ref, mask, adv = make_batch()
    max_len = T + 5 if loss_type == "dr_grpo" else None  # dr_grpo's constant must reach the divisor
    kw = dict(beta=beta, ref_logp=ref if beta else None, level=level, max_completion_length=max_len)
    loss, grad, stats = ours(logp, old, adv, mask, loss_type=loss_type, **kw)
    t_loss, t_grad, t_metrics = trl_loss(
        logp, old, adv, mask, loss_type=loss_type, beta=beta, ref=ref if beta else None, level=level, max_len=max_len
    )
    assert abs(loss.item() - t_loss.item()) < TOL, (loss.item(), t_loss.item())
    assert (grad - t_grad).abs().max().item() < TOL
    if beta:
        assert abs(stats["kl"] - t_metrics["kl"]) < TOL
    # token level: token means; sequence level (GSPO): both report the share of sequences clipped
    assert abs(stats["clip_low"] - t_metrics["clip_ratio/low_mean"]) < TOL
    assert abs(stats["clip_high"] - t_metrics["clip_ratio/high_mean"]) < TOL
    assert abs(stats["clip_fraction"] - t_metrics["clip_ratio/region_mean"]) < TOL


def test_dr_grpo_default_length_is_t():
    logp, old, _, mask, adv = make_batch(1)
    loss, _, _ = ours(logp, old, adv, mask, loss_type="dr_grpo")
    t_loss, _, _ = trl_loss(logp, old, adv, mask, loss_type="dr_grpo", max_len=T)
    assert abs(loss.item() - t_loss.item()) < TOL


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_with_global_counts_match_trl_accumulation(loss_type):
    """Two micro-batches of one generation batch under gradient accumulation: TRL divides grpo/dr_grpo by
    the accumulation steps and dapo by the generation batch's token count; ``normalise`` given the global
    counts gives the same shares, and they add up to the whole batch's loss."""
    logp, old, _, mask, adv = make_batch(2)
    total_tokens = int(mask.sum())
    shares = []
    for rows in (slice(0, 3), slice(3, 6)):
        t_loss, _, _ = trl_loss(
            logp[rows],
            old[rows],
            adv[rows],
            mask[rows],
            loss_type=loss_type,
            max_len=T,
            num_items=total_tokens,
            accumulation=2,
        )
        token_loss, _ = per_token_loss(logp[rows], old[rows], adv[rows], mask[rows], eps_low=EPS_LOW, eps_high=EPS_HIGH)
        share = normalise(token_loss, mask[rows], loss_type, sequences=B, tokens=total_tokens)
        assert abs(share.item() - t_loss.item()) < TOL
        shares.append(share)
    whole, _, _ = ours(logp, old, adv, mask, loss_type=loss_type)
    assert abs(sum(shares).item() - whole.item()) < TOL


def test_sequence_level_clip_stats_match_trl():
    logp, old, _, mask, adv = make_batch()
    _, _, stats = ours(logp, old, adv, mask, loss_type="grpo", level="sequence")
    _, _, t_metrics = trl_loss(logp, old, adv, mask, loss_type="grpo", level="sequence")
    assert abs(stats["clip_fraction"] - t_metrics["clip_ratio/region_mean"]) < TOL


def test_parity_checks_are_sensitive():
    """The batch exercises both clip sides, so a swapped epsilon, a missing KL term or another loss type's
    normalisation would all break the parity above."""
    logp, old, ref, mask, adv = make_batch()
    _, _, m = trl_loss(logp, old, adv, mask, loss_type="grpo")
    assert m["clip_ratio/low_mean"] > 0.05 and m["clip_ratio/high_mean"] > 0.05
    loss, _, _ = ours(logp, old, adv, mask, loss_type="grpo")
    swapped, _, _ = trl_loss(logp, old, adv, mask, loss_type="grpo", eps_low=EPS_HIGH, eps_high=EPS_LOW)
    assert abs(loss.item() - swapped.item()) > 1e-3
    with_kl, _, _ = trl_loss(logp, old, adv, mask, loss_type="grpo", beta=0.04, ref=ref)
    assert abs(loss.item() - with_kl.item()) > 1e-3
    values = [trl_loss(logp, old, adv, mask, loss_type=lt)[0].item() for lt in ("grpo", "bnpo", "dr_grpo")]
    assert min(abs(a - b) for i, a in enumerate(values) for b in values[i + 1 :]) > 1e-3
    gspo, _, _ = trl_loss(logp, old, adv, mask, loss_type="grpo", level="sequence")
    assert abs(loss.item() - gspo.item()) > 1e-3
    perturbed = old.clone()
    perturbed[0, 0] += 0.5
    moved, _, _ = ours(logp, perturbed, adv, mask, loss_type="grpo")
    assert abs(loss.item() - moved.item()) > 1e-4


def _trl_advantage_block():
    """The reward-to-advantage lines of TRL's _generate_and_score_completions, compiled on their own."""
    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, l in enumerate(lines) if "unscorable_mask = torch.isnan(rewards_per_func)" in l)
    end = next(i for i, l in enumerate(lines) if "advantages = torch.nan_to_num(advantages" in l)
    return compile(textwrap.dedent("\n".join(lines[start : end + 1])), "trl_advantages", "exec")


def trl_advantages(rewards, group_size, scale):
    scope = dict(vars(trl_grpo))  # TRL's module globals: torch, nanstd, ...
    scope.update(
        self=SimpleNamespace(
            multi_objective_aggregation="sum_then_normalize", scale_rewards=scale, reward_weights=torch.ones(1)
        ),
        rewards_per_func=rewards[:, None].clone(),
        num_generations=group_size,
        device=rewards.device,
        mode="train",
    )
    exec(_trl_advantage_block(), scope)
    return scope["advantages"]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_group_advantages_match_trl(scale, group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 3, (12,), generator=g).double() / 2
    rewards[:group_size] = 0.5  # one group with zero std
    adv = group_advantages(rewards, group_size, scale)
    assert (adv - trl_advantages(rewards, group_size, scale)).abs().max().item() < TOL


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=torch.float64)
    std = 2**-0.5  # unbiased std of (1, 0)
    torch.testing.assert_close(
        group_advantages(rewards, 2, "group"), torch.tensor([0.5, -0.5, 0, 0]).double() / (std + 1e-4)
    )
    torch.testing.assert_close(group_advantages(rewards, 2, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]).double())
    batch_std = rewards.std().item()
    torch.testing.assert_close(
        group_advantages(rewards, 2, "batch"), torch.tensor([0.5, -0.5, 0, 0]).double() / (batch_std + 1e-4)
    )
    assert not torch.allclose(trl_advantages(rewards, 2, "group"), trl_advantages(rewards, 2, "batch"))
