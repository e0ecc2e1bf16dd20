"""Policy-gradient losses of the GRPO family, written once with the shared parts shared.

For completion tokens t of sequence i (mask m_it = 1), with log-probs under the policy
(logp), the policy that sampled the rollouts (old_logp) and a frozen reference (ref_logp):

    r_it   = exp(logp_it - old_logp_it)                       token-level ratio (GRPO, DAPO)
           = exp(mean_t (logp_it - old_logp_it))              sequence-level ratio (GSPO)
    l_it   = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) + beta KL3_it
    KL3_it = exp(ref - logp) - (ref - logp) - 1               the k3 estimator of KL(pi || ref)

and the loss types differ only in how the token terms are averaged:

    grpo     per-sequence token mean, then mean over sequences    (DeepSeekMath, R1)
    bnpo     sum over tokens / tokens in the batch
    dapo     sum over tokens / tokens in the batch; with data parallelism, of the whole
             global batch (DAPO's token-level mean)
    dr_grpo  sum over tokens / (sequences x max completion length)   (Dr. GRPO)

``normalise`` takes the global counts so that micro-batches on several ranks add up to
the loss of the one big batch; called without them it uses the batch it is given.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # added to the reward std before dividing, as in TRL


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", std: float | None = None
) -> torch.Tensor:
    """Advantages of ``rewards`` [N], ordered group by group: reward minus its group's mean,
    divided by the (unbiased) std of the group (``"group"``, GRPO), of the whole batch
    (``"batch"``; ``std`` gives the global batch's under data parallelism) or not at all
    (``"none"``, Dr. GRPO), plus STD_EPS."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale {scale!r} is not one of {SCALES}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    adv = (grouped - grouped.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        std = grouped.std(dim=1) if group_size > 1 else torch.zeros(grouped.shape[0], dtype=rewards.dtype)
        adv = adv / (std.repeat_interleave(group_size) + STD_EPS)
    elif scale == "batch":
        if std is None:
            std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        adv = adv / (std + STD_EPS)
    return adv


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - logp
    (non-negative, unbiased, low variance; Schulman 2020)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def per_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    level: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (plus beta x k3 KL) per token [B, T], and per-token figures for
    the statistics (``kl``, ``clip_low``, ``clip_high``, the importance ``ratio``; masked
    sums are the caller's)."""
    if level not in LEVELS:
        raise ValueError(f"importance-ratio level {level!r} is not one of {LEVELS}")
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if level == "sequence":  # GSPO: one ratio per sequence, the geometric mean of its tokens'
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1).to(logp.dtype)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    stats = {
        "clip_low": ((ratio < 1 - eps_low) & (adv < 0)).expand_as(logp).to(logp.dtype).detach(),
        "clip_high": ((ratio > 1 + eps_high) & (adv > 0)).expand_as(logp).to(logp.dtype).detach(),
        "ratio": ratio.expand_as(logp).detach(),
    }
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp)")
        kl = k3_kl(logp, ref_logp)
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    elif ref_logp is not None:
        stats["kl"] = k3_kl(logp, ref_logp).detach()
    return loss, stats


def normalise(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    *,
    sequences: float | None = None,
    tokens: float | None = None,
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce per-token terms [B, T] to this batch's share of the loss (see the module
    docstring). ``sequences`` and ``tokens`` are the counts of the whole (global) batch;
    by default those of ``mask``."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss type {loss_type!r} is not one of {LOSS_TYPES}")
    mask = mask.to(token_loss.dtype)
    sequences = float(mask.shape[0]) if sequences is None else float(sequences)
    masked = token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    if loss_type == "dr_grpo":
        length = mask.shape[1] if max_completion_length is None else max_completion_length
        return masked.sum() / (sequences * length)
    tokens = mask.sum().clamp(min=1.0) if tokens is None else max(float(tokens), 1.0)
    return masked.sum() / tokens


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    level: str = "token",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one whole batch and its statistics: ``kl`` (token mean, when reference
    log-probs are given), ``clip_low``, ``clip_high`` (token means; with GSPO's
    sequence-level ratio, the share of sequences), ``clip_fraction`` (their sum) and
    ``ratio`` (the importance ratio's mean, over tokens or sequences alike)."""
    token_loss, per_token = per_token_loss(
        logp,
        old_logp,
        advantages,
        mask,
        eps_low=eps_low,
        eps_high=eps_high,
        beta=beta,
        ref_logp=ref_logp,
        level=level,
    )
    loss = normalise(token_loss, mask, loss_type, max_completion_length=max_completion_length)
    m = mask.to(logp.dtype)
    n = m.sum().clamp(min=1.0)
    stats = {k: float((v * m).sum() / n) for k, v in per_token.items()}
    if level == "sequence":  # one ratio per sequence: the share of sequences clipped
        stats.update({k: float(per_token[k][:, 0].mean()) for k in ("clip_low", "clip_high", "ratio")})
    stats["clip_fraction"] = stats["clip_low"] + stats["clip_high"]
    return loss, stats
