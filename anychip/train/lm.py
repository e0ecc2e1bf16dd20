"""Next-token prediction, the objective of pretraining and SFT (``train.mode``), with
DeepSeek-V3's multi-token prediction and sequence-wise balance terms:

    L = L_main + (lambda / D) * sum_k L_MTP^k + L_Bal

each cross-entropy averaged over the label tokens of the whole global batch (the MTP depth
k over the labels it can see: ``labels[:, k:]``), the balance term over its rows.
"""

from __future__ import annotations

from ..models import ModelArgs, training_flops_per_token
from .step import Objective, Part, Work

IGNORE = -100


class NextTokenLoss(Objective):
    def __init__(self, args: ModelArgs, mtp_depth: int, seq_len: int, global_batch: int):
        self.args = args
        self.depth = mtp_depth if args.mtp_loss_weight else 0  # MTP layers that carry a loss
        flops_per_token, _, _ = training_flops_per_token(args, seq_len)
        self.tokens_per_step = global_batch * seq_len
        self.flops_per_step = flops_per_token * self.tokens_per_step

    def counts(self, batch: dict) -> dict[str, float]:
        labels = batch["labels"]
        out = {"lm": float((labels != IGNORE).sum())}
        for k in range(1, self.depth + 1):
            out[f"mtp_{k}"] = float((labels[:, k:] != IGNORE).sum())
        out["rows"] = float(labels.shape[0])
        return out

    def __call__(self, forward, micro: dict, counts: dict[str, float]) -> Part:
        x, y = micro["input_ids"], micro["labels"]
        out = forward(x, labels=y, reduction="sum")
        loss = out.lm_loss / max(counts["lm"], 1.0)
        sums = {"lm": out.lm_loss.item()}
        for k, term in enumerate(out.mtp_losses, start=1):
            loss = loss + self.args.mtp_loss_weight / self.depth * term / max(counts[f"mtp_{k}"], 1.0)
            sums[f"mtp_{k}"] = term.item()
        if out.balance_loss is not None:
            # weighted by this micro-batch's share of the global batch's rows
            loss = loss + out.balance_loss * x.shape[0] / counts["rows"]
            sums["balance"] = out.balance_loss.item() * x.shape[0] / counts["rows"]
        return Part(loss, sums)

    def figures(self, sums: dict[str, float], counts: dict[str, float], batch: dict) -> dict[str, float]:
        lm = sums["lm"] / max(counts["lm"], 1.0)
        mtp = [sums[f"mtp_{k}"] / max(counts[f"mtp_{k}"], 1.0) for k in range(1, self.depth + 1)]
        balance = sums.get("balance", 0.0)
        mtp_term = self.args.mtp_loss_weight * sum(mtp) / self.depth if self.depth else 0.0
        out = {"loss": lm + mtp_term + balance, "lm_loss": lm, "tokens": int(max(counts["lm"], 1.0))}
        if mtp:
            out["mtp_loss"] = sum(mtp) / self.depth
        if self.args.seq_aux_loss_alpha:
            out["balance_loss"] = balance
        return out

    def headline(self, figures: dict[str, float]) -> str:
        return f"loss {figures['loss']:.4f}  lm {figures['lm_loss']:.4f}"

    def work(self, batch: dict, counts: dict[str, float]) -> Work:
        return Work(self.tokens_per_step, self.flops_per_step)
