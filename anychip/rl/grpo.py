"""GRPO-family reinforcement learning inside anychip's training loop (``train.mode = "grpo"``).

One loop step is one optimizer update, exactly as in supervised training, so metrics,
guards, checkpoints, fault injection and recovery are the loop's own. What changes is
where a step's batch comes from and what its loss is:

    RolloutBatches.next_batch()     (the data source; TokenBatches' role)
        when the previous rollout batch is used up:
        sync the rollout copy of the policy (a full copy under FSDP, the replica otherwise)
        each rank samples grpo.group_size completions for each of its prompts
            (KV-cache batched sampling, anychip.generate; groups never span ranks)
        rewards per component -> group-normalised advantages
        DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts
        old-policy log-probs (when the batch is used for more than one update), reference
            log-probs (when beta > 0)
        -> grpo.iterations passes x grpo.minibatches minibatches = one update each
    policy_step()                   (forward_backward's role)
        log-probs of the completions under the policy, the chosen loss (anychip.rl.losses)
        normalised by the counts of the whole global minibatch, so micro-batches and ranks
        add up to one big batch

Every rank draws its own prompts (example ``k * world_size + rank`` of the train split, k
counting up) and seeds its sampler from (grpo.seed, rollout, rank, round): a resumed run
samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import time
from collections import deque

import torch
import torch.nn.functional as F

from ..data import Example
from ..eval import never_generated
from ..generate import generate
from ..models import training_flops_per_token
from ..parallel import World, all_reduce_sum, full_state_dict, unwrap
from .losses import group_advantages, normalise, per_token_loss
from .rewards import Completion, Rewards

STOP = "</answer>"
IGNORE = -100


def updates_per_rollout(cfg) -> int:
    return cfg.grpo.iterations * cfg.grpo.minibatches


def prepare_policy(model) -> None:
    """Before wrapping: MTP modules get no RL gradient; freeze them (DDP and the optimizer skip them)."""
    for p in model.mtp.parameters():
        p.requires_grad_(False)


def make_reference(model) -> torch.nn.Module:
    """A frozen copy of the (unwrapped, unsharded) starting policy."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def token_logprobs(
    model, input_ids: torch.Tensor, targets: torch.Tensor, micro: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(target_t | input_<=t) for every position, [B, T], float32, in chunks of ``micro``
    rows, of the policy at the sampling ``temperature`` (logits / temperature)."""
    out = []
    for start in range(0, input_ids.shape[0], micro):
        logp = log_softmax(model(input_ids[start : start + micro]), temperature)
        out.append(logp.gather(-1, targets[start : start + micro].clamp(min=0).unsqueeze(-1)).squeeze(-1))
    return torch.cat(out)


def log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of the sampling distribution: the policy whose ratios and KL the
    losses take is the one the rollouts were drawn from (as TRL and verl do)."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


class RolloutBatches:
    """Minibatches of sampled, scored completions, one per optimizer update; resumable at
    rollout boundaries (``state_dict``), which is where checkpoints fall."""

    def __init__(self, state, source):
        self.state = state
        cfg = state.cfg
        self.g = cfg.grpo
        self.cfg = cfg
        self.source = source
        self.tokenizer = state.tokenizer
        self.world: World = state.world
        self.rewards = Rewards(self.g.rewards, source.score, self.g.max_new_tokens, self.g.overlong_buffer)
        self.stop = [self.tokenizer.encode(STOP)]
        self.cursor = 0  # prompts this rank has drawn
        self.stats = {"batches": 0, "rollouts": 0}
        self._queue: deque[dict] = deque()
        self._rollout_model = None  # the full copy used for sampling under FSDP

    # -- resumable state -----------------------------------------------------------

    def state_dict(self) -> dict:
        if self._queue:
            raise RuntimeError(
                f"a GRPO checkpoint must fall between rollout batches ({len(self._queue)} minibatches left); "
                "checkpoint.interval and train.steps must be multiples of grpo.iterations x grpo.minibatches"
            )
        return {"version": 1, "cursor": self.cursor, **self.stats}

    def load_state_dict(self, sd: dict) -> None:
        self.cursor = int(sd["cursor"])
        self.stats = {"batches": int(sd["batches"]), "rollouts": int(sd["rollouts"])}
        self._queue.clear()

    # -- batches -------------------------------------------------------------------

    def next_batch(self) -> dict:
        if not self._queue:
            self._queue.extend(self._rollout())
        self.stats["batches"] += 1
        return self._queue.popleft()

    def _prompts(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            out.append(self.source.example(self.cursor * self.world.world_size + self.world.rank))
            self.cursor += 1
        return out

    def _sampler(self, rnd: int) -> torch.Generator:
        dev = self._policy_for_sampling().embed_tokens.weight.device
        seed = (self.g.seed * 1_000_003 + self.stats["rollouts"] * 10_007 + self.world.rank * 101 + rnd) % 2**63
        return torch.Generator(device=dev).manual_seed(seed)

    def _policy_for_sampling(self):
        model = self.state.model
        if self.world.distributed and self.cfg.parallel.strategy == "fsdp":
            return self._rollout_model
        return unwrap(model)

    def _sync_rollout_model(self) -> None:
        if not (self.world.distributed and self.cfg.parallel.strategy == "fsdp"):
            return
        full = full_state_dict(self.state.model, self.world)
        if self._rollout_model is None:
            core = unwrap(self.state.model)
            from ..models import DeepSeekV3

            self._rollout_model = DeepSeekV3(core.args).to(full["embed_tokens.weight"].device)
            self._rollout_model.materialize_counters()
        self._rollout_model.load_state_dict(full)

    def _sample(self, examples: list[Example], rnd: int) -> tuple[list[list[int]], list[list[int]], list[Completion]]:
        g, tok = self.g, self.tokenizer
        prompts = [[tok.bos_id, *tok.encode(ex.prompt)] for ex in examples for _ in range(g.group_size)]
        policy = self._policy_for_sampling()
        was_training = policy.training
        policy.eval()
        try:
            outs = generate(
                policy, prompts, g.max_new_tokens, tok.eos_id, tok.pad_id, stop=self.stop, temperature=g.temperature,
                top_k=g.top_k, top_p=g.top_p, generator=self._sampler(rnd), vocab_size=tok.vocab_size,
                suppress=never_generated(tok),
            )  # fmt: skip
        finally:
            policy.train(was_training)
        completions = []
        for out in outs:
            ended = bool(out) and (out[-1] == tok.eos_id or out[-len(self.stop[0]) :] == self.stop[0])
            text = tok.decode([t for t in out if t != tok.eos_id])
            completions.append(Completion(text, len(out), truncated=not ended))
        return prompts, outs, completions

    def _rollout(self) -> list[dict]:
        g, world = self.g, self.world
        t0 = time.perf_counter()
        self._sync_rollout_model()
        want = g.prompts_per_step // world.world_size
        kept: list[tuple] = []  # (example, prompt, completion tokens, Completion, reward) per sequence
        seen = {"reward": 0.0, "n": 0, "groups": 0, "dropped": 0, "parts": {k: 0.0 for k in self.rewards.weights},
                "correct": 0.0, "length": 0, "truncated": 0, "generated": 0, "prompt_tokens": 0}  # fmt: skip
        rnd = 0
        spare: list[tuple] = []  # all-equal groups, used only if the rounds run out
        while len(kept) < want * g.group_size:
            need = want - len(kept) // g.group_size
            examples = self._prompts(need)
            prompts, outs, completions = self._sample(examples, rnd)
            expanded = [ex for ex in examples for _ in range(g.group_size)]
            total, parts = self.rewards(expanded, completions)
            seen["n"] += len(total)
            seen["reward"] += sum(total)
            for k, v in parts.items():
                seen["parts"][k] += sum(v)
            seen["correct"] += sum(float(s >= 1.0) for s in self.rewards.correct(expanded, completions, parts))
            seen["length"] += sum(c.length for c in completions)
            seen["truncated"] += sum(c.truncated for c in completions)
            seen["generated"] += sum(len(o) for o in outs)
            seen["prompt_tokens"] += sum(len(p) for p in prompts)
            for i in range(need):
                rows = [
                    (expanded[j], prompts[j], outs[j], completions[j], total[j])
                    for j in range(i * g.group_size, (i + 1) * g.group_size)
                ]
                seen["groups"] += 1
                rewards = [r[-1] for r in rows]
                if g.dynamic_sampling and max(rewards) == min(rewards):
                    seen["dropped"] += 1
                    spare.extend(rows)
                    continue
                kept.extend(rows)
            rnd += 1
            if not g.dynamic_sampling or rnd >= g.max_sampling_rounds:
                break
        short = want * g.group_size - len(kept)
        if short:  # dynamic sampling ran out of rounds: fill with all-equal groups (zero advantage)
            kept.extend(spare[:short])
        self.stats["rollouts"] += 1
        batch = self._tensors(kept)
        batch["rollout_metrics"] = self._rollout_metrics(
            seen, short // g.group_size, batch.pop("forward_tokens"), time.perf_counter() - t0
        )
        return self._split(batch)

    def _tensors(self, rows: list[tuple]) -> dict:
        g, tok, world = self.g, self.tokenizer, self.world
        rewards = torch.tensor([r[4] for r in rows], dtype=torch.float32)
        std = None
        if g.advantage_scale == "batch" and world.distributed:
            s = all_reduce_sum(
                torch.tensor([len(rows), rewards.sum(), (rewards.double() ** 2).sum()], dtype=torch.float64), world
            )
            n, mean = s[0], s[1] / s[0]
            std = float(((s[2] - n * mean**2) / (n - 1).clamp(min=1)).clamp(min=0).sqrt())
        adv = group_advantages(rewards, g.group_size, g.advantage_scale, std=std)
        seqs = [p + o for _, p, o, _, _ in rows]
        width = max(len(s) for s in seqs) - 1
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        for i, ((_, p, _, c, _), s) in enumerate(zip(rows, seqs)):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
            targets[i, : len(s) - 1] = torch.tensor(s[1:])
            if not (g.overlong_filter and c.truncated):
                mask[i, len(p) - 1 : len(s) - 1] = 1.0  # positions that predict completion tokens
        labels = torch.where(mask.bool(), targets, torch.full_like(targets, IGNORE))
        batch = {"input_ids": ids, "labels": labels, "mask": mask, "advantages": adv}
        dev = unwrap(self.state.model).embed_tokens.weight.device
        micro = self.cfg.train.micro_batch or ids.shape[0]
        if updates_per_rollout(self.cfg) > 1:  # the policy moves between updates: keep the sampling policy's
            policy = self._policy_for_sampling()
            policy.eval()
            batch["old_logp"] = token_logprobs(policy, ids.to(dev), targets.to(dev), micro, g.temperature).cpu()
            policy.train()
        if self.state.ref_model is not None and g.beta:
            batch["ref_logp"] = token_logprobs(
                self.state.ref_model, ids.to(dev), targets.to(dev), micro, g.temperature
            ).cpu()
        batch["forward_tokens"] = ids.numel() * (("old_logp" in batch) + ("ref_logp" in batch))
        return batch

    def _rollout_metrics(self, seen: dict, short: int, forward_tokens: int, dt: float) -> dict:
        n_parts = list(seen["parts"])
        t = torch.tensor(
            [seen["n"], seen["reward"], seen["correct"], seen["length"], seen["truncated"], seen["groups"],
             seen["dropped"], short, seen["generated"], seen["prompt_tokens"], forward_tokens,
             *(seen["parts"][k] for k in n_parts)],
            dtype=torch.float64,
        )  # fmt: skip
        t = all_reduce_sum(t, self.world)
        n = max(t[0].item(), 1.0)
        out = {
            "reward": t[1].item() / n,
            "accuracy": t[2].item() / n,
            "response_length": t[3].item() / n,
            "truncated": t[4].item() / n,
            "groups_dropped": t[6].item() / max(t[5].item(), 1.0) if self.g.dynamic_sampling else 0.0,
            "groups_short": t[7].item(),
            "generated_tokens": t[8].item(),
            "prompt_tokens": t[9].item(),
            "forward_tokens": t[10].item(),
            "rollout_time": dt,
        }
        for i, k in enumerate(n_parts):
            out[f"reward/{k}"] = t[11 + i].item() / n
        return out

    def _split(self, batch: dict) -> list[dict]:
        """grpo.iterations passes over grpo.minibatches contiguous minibatches (whole groups)."""
        g = self.g
        rows = batch["input_ids"].shape[0]
        per = rows // g.minibatches
        out = []
        for it in range(g.iterations):
            for m in range(g.minibatches):
                part = {k: (v[m * per : (m + 1) * per] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                part["first"] = it == 0 and m == 0  # the update that carries the rollout's cost
                out.append(part)
        return out


def policy_step(cfg, model, batch: dict, micro: int, amp, device, world: World) -> dict:
    """Gradients of the configured GRPO-family loss on ``batch`` (one minibatch), with the
    normalisers of the whole global minibatch; returns the step's figures."""
    from ..train.loop import autocast, no_sync

    g = cfg.grpo
    core = unwrap(model)
    dev = core.embed_tokens.weight.device
    ids, labels, mask, adv = batch["input_ids"], batch["labels"], batch["mask"], batch["advantages"]
    targets = labels.clamp(min=0)
    counts = torch.tensor([float(ids.shape[0]), mask.sum().item(), float(ids.numel())], dtype=torch.float64)
    counts = all_reduce_sum(counts, world)
    sequences, tokens, row_tokens = counts[0].item(), counts[1].item(), counts[2].item()
    micro = micro or ids.shape[0]
    sums = torch.zeros(6, dtype=torch.float64)  # loss, kl, clip_low, clip_high, entropy, masked tokens
    chunks = range(0, ids.shape[0], micro)
    for i, start in enumerate(chunks):
        sl = slice(start, start + micro)
        x, m = ids[sl].to(dev), mask[sl].to(dev)
        with no_sync(model, i == len(chunks) - 1):
            with autocast(device, amp):
                logits = model(x)
            logp_all = log_softmax(logits, g.temperature)
            logp = logp_all.gather(-1, targets[sl].to(dev).unsqueeze(-1)).squeeze(-1)
            old = batch["old_logp"][sl].to(dev) if "old_logp" in batch else logp.detach()
            ref = batch["ref_logp"][sl].to(dev) if "ref_logp" in batch else None
            tok_loss, per_tok = per_token_loss(
                logp, old, adv[sl].to(dev), m, eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta, ref_logp=ref,
                level=g.importance,
            )  # fmt: skip
            loss = normalise(tok_loss, m, g.loss, sequences=sequences, tokens=tokens,
                             max_completion_length=g.max_new_tokens)  # fmt: skip
            (loss * world.world_size).backward()
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            if g.importance == "sequence":  # one ratio per sequence: count sequences
                clip_low, clip_high = per_tok["clip_low"][:, 0].sum().item(), per_tok["clip_high"][:, 0].sum().item()
            else:
                clip_low, clip_high = (per_tok["clip_low"] * m).sum().item(), (per_tok["clip_high"] * m).sum().item()
            sums += torch.tensor([
                loss.item(), (per_tok["kl"] * m).sum().item() if "kl" in per_tok else 0.0, clip_low, clip_high,
                (entropy * m).sum().item(), m.sum().item(),
            ], dtype=torch.float64)  # fmt: skip
    sums = all_reduce_sum(sums, world)
    n = max(sums[5].item(), 1.0)
    n_clip = sequences if g.importance == "sequence" else n
    out = {
        "loss": sums[0].item(),
        "kl": sums[1].item() / n,
        "clip_low": sums[2].item() / n_clip,
        "clip_high": sums[3].item() / n_clip,
        "clip_fraction": (sums[2].item() + sums[3].item()) / n_clip,
        "entropy": sums[4].item() / n,
        "tokens": int(tokens),
    }
    # the rollout's figures, logged with every update made from it
    rollout = batch["rollout_metrics"]
    out.update(rollout)
    # FLOPs: forward + backward over the rows; forward only for sampling (prefill and one
    # token per decode step) and the old-policy / reference log-probs, on the rollout's first update
    per_token, _, _ = training_flops_per_token(core.args.replace(num_nextn_predict_layers=0), ids.shape[1])
    forward_only = 0.0
    if batch["first"]:
        forward_only = rollout["generated_tokens"] + rollout["prompt_tokens"] + rollout["forward_tokens"]
    out["step_tokens"] = row_tokens
    out["step_flops"] = per_token * row_tokens + per_token / 3 * forward_only
    return out


@torch.no_grad()
def reset_reference(state) -> None:
    """The reference policy becomes the current policy (``grpo.ref_reset_interval``)."""
    if state.ref_model is not None:
        state.ref_model.load_state_dict(full_state_dict(state.model, state.world))
        state.log.event("reference_reset", step=state.step)
