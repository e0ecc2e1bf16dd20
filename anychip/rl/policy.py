"""The GRPO-family policy loss as a training objective (``anychip.train.step``): log-probs
of the sampled completions under the policy, the loss ``grpo.loss`` names
(``anychip.rl.losses``), normalised by the counts of the whole global minibatch so that
micro-batches and ranks add up to one big batch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..models import ModelArgs, training_flops_per_token
from ..train.step import Objective, Part, Work
from .losses import k3_kl, normalise, per_token_loss

if TYPE_CHECKING:  # the [grpo] section's type only: rl does not depend on the config module
    from ..config import GRPOConfig


def log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of the sampling distribution: the policy whose ratios and KL the
    losses take is the one the rollouts were drawn from (as TRL and verl do)."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


class PolicyLoss(Objective):
    """One minibatch of a rollout: rows of prompt + completion with ``labels`` (completion
    tokens, else -100), ``mask``, ``advantages``, optionally ``old_logp``, ``ref_logp`` and
    ``sampler_logp`` (the sampler's own log-probs of the completion tokens), and the
    rollout's figures (``rollout``, logged with every update made from it)."""

    def __init__(self, g: GRPOConfig, args: ModelArgs):
        self.g = g
        self.args = args.replace(num_nextn_predict_layers=0)  # the MTP module gets no RL gradient

    def counts(self, batch: dict) -> dict[str, float]:
        ids = batch["input_ids"]
        return {"sequences": float(ids.shape[0]), "tokens": batch["mask"].sum().item(), "rows": float(ids.numel())}

    def __call__(self, forward, micro: dict, counts: dict[str, float]) -> Part:
        g, m = self.g, micro["mask"]
        logp_all = log_softmax(forward(micro["input_ids"]), g.temperature)
        targets = micro["labels"].clamp(min=0)
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        old = micro["old_logp"] if "old_logp" in micro else logp.detach()
        tok_loss, per_tok = per_token_loss(
            logp,
            old,
            micro["advantages"],
            m,
            eps_low=g.eps_low,
            eps_high=g.eps_high,
            beta=g.beta,
            ref_logp=micro.get("ref_logp"),
            level=g.importance,
        )
        loss = normalise(
            tok_loss,
            m,
            g.loss,
            sequences=counts["sequences"],
            tokens=counts["tokens"],
            max_completion_length=g.max_new_tokens,
        )
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            if g.importance == "sequence":  # one ratio per sequence: count sequences
                ratio_sums = {k: per_tok[k][:, 0].sum() for k in ("clip_low", "clip_high", "ratio")}
                ratio_sums["ratio_dev"] = (per_tok["ratio"][:, 0] - 1).abs().sum()
            else:
                ratio_sums = {k: (per_tok[k] * m).sum() for k in ("clip_low", "clip_high", "ratio")}
                ratio_sums["ratio_dev"] = ((per_tok["ratio"] - 1).abs() * m).sum()
            # the trainer's log-probs under the weights the rollout was sampled with: the old
            # policy's, or (one update per rollout) this very update's
            sampler = micro.get("sampler_logp")
            sampler_kl = (k3_kl(sampler, old) * m).sum() if sampler is not None else m.new_zeros(())
            sums = {
                "loss": loss.detach(),
                "kl": (per_tok["kl"] * m).sum() if "kl" in per_tok else m.new_zeros(()),
                **ratio_sums,
                "sampler_kl": sampler_kl,
                "entropy": (entropy * m).sum(),
                "masked": m.sum(),
            }
            sums = dict(zip(sums, torch.stack([v.to(torch.float64) for v in sums.values()]).tolist()))  # one host read
        return Part(loss, sums)

    def figures(self, sums: dict[str, float], counts: dict[str, float], batch: dict) -> dict[str, float]:
        n = max(sums["masked"], 1.0)
        n_clip = counts["sequences"] if self.g.importance == "sequence" else n
        return {
            "loss": sums["loss"],
            "kl": sums["kl"] / n,
            "clip_low": sums["clip_low"] / n_clip,
            "clip_high": sums["clip_high"] / n_clip,
            "clip_fraction": (sums["clip_low"] + sums["clip_high"]) / n_clip,
            "ratio_mean": sums["ratio"] / n_clip,
            "ratio_dev": sums["ratio_dev"] / n_clip,  # mean |ratio - 1|: a sum adds up over ranks, a max would not
            "sampler_kl": sums["sampler_kl"] / n,
            "entropy": sums["entropy"] / n,
            "tokens": int(counts["tokens"]),
            **batch["rollout"].metrics(),
        }

    def headline(self, m: dict[str, float]) -> str:
        return (
            f"reward {m['reward']:.3f}  accuracy {m['accuracy']:.3f}  kl {m['kl']:.4f}  clip {m['clip_fraction']:.3f}  "
            f"length {m['response_length']:.1f}  entropy {m['entropy']:.3f}"
        )

    def work(self, batch: dict, counts: dict[str, float]) -> Work:
        """Forward and backward over the rows; on the rollout's first update also the forward-only
        work of sampling (prefill and one token per decode step) and of the old-policy and
        reference log-probs."""
        per_token, _, _ = training_flops_per_token(self.args, batch["input_ids"].shape[1])
        rollout = batch["rollout"]
        forward_only = rollout.generated_tokens + rollout.prompt_tokens + rollout.forward_tokens
        if not batch["first"]:
            forward_only = 0.0
        return Work(counts["rows"], per_token * counts["rows"] + per_token / 3 * forward_only)
