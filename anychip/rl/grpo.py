"""GRPO-family reinforcement learning inside anychip's training loop (``train.mode = "grpo"``).

One loop step is one optimizer update, exactly as in supervised training, so metrics,
guards, checkpoints, fault injection and recovery are the loop's own. What changes is
where a step's batch comes from and what its loss is:

    RolloutBatches.next_batch()     (the data source; TokenBatches' role)
        when the previous rollout batch is used up:
        each rank samples grpo.group_size completions for each of its prompts from the
            training policy itself, in eval mode under the update's autocast (KV-cache
            batched sampling, anychip.generate; groups never span ranks; sharded under
            FSDP, where the ranks decode in lockstep), keeping each token's log-prob
        rewards per component -> group-normalised advantages
        DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts
        old-policy log-probs (when the batch is used for more than one update), reference
            log-probs (when beta > 0): the update's forward (autocast) on the update's
            micro-batches, so that an unchanged policy gives a ratio of exactly 1 and a
            reference equal to the policy a KL of exactly 0
        -> grpo.iterations passes x grpo.minibatches minibatches = one update each, each
           a dict of tensors plus the rollout's figures (``RolloutFigures``)
    PolicyLoss (anychip.rl.policy)  the Objective of the step (next-token loss's role), run by
        the same micro-batch driver as supervised training (anychip.train.step)

A rollout's sequences are ``Row`` records, its counts a ``Tally`` summed over ranks.

Every rank draws its own prompts (example ``k * world_size + rank`` of the train split, k
counting up) and seeds its sampler from (grpo.seed, rollout, rank, round): a resumed run
samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..data import Example
from ..eval import never_generated
from ..generate import generate, sharded
from ..guards.sdc import fingerprint
from ..parallel import World, all_reduce_sum, all_reduce_sums, unwrap
from ..train.step import Forward, autocast
from .losses import group_advantages
from .policy import log_softmax
from .rewards import Completion, Rewards

if TYPE_CHECKING:  # the [grpo] section's type only: rl does not depend on the config module
    from ..config import GRPOConfig

STOP = "</answer>"
IGNORE = -100


@dataclass
class Row:
    """One sampled sequence of a group."""

    example: Example
    prompt: list[int]
    completion: list[int]
    logp: list[float]  # of each completion token, as the sampler drew it
    scored: Completion
    reward: float


@dataclass
class Tally:
    """What this rank's sampling rounds of one rollout saw (summed over ranks by ``RolloutFigures.of``)."""

    sequences: int = 0
    reward: float = 0.0
    correct: float = 0.0
    length: int = 0
    truncated: int = 0
    groups: int = 0
    dropped: int = 0
    short: int = 0  # groups missing after the last round of dynamic sampling
    generated: int = 0
    prompt_tokens: int = 0
    forward_tokens: int = 0  # of the old-policy and reference log-probs
    parts: dict[str, float] = field(default_factory=dict)  # per reward component

    def count(self, total, parts, correct, completions, outs, prompts) -> None:
        self.sequences += len(total)
        self.reward += sum(total)
        for k, v in parts.items():
            self.parts[k] += sum(v)
        self.correct += sum(float(s >= 1.0) for s in correct)
        self.length += sum(c.length for c in completions)
        self.truncated += sum(c.truncated for c in completions)
        self.generated += sum(len(o) for o in outs)
        self.prompt_tokens += sum(len(p) for p in prompts)


@dataclass
class RolloutFigures:
    """A rollout's figures, all ranks together, logged with every update made from it."""

    reward: float
    accuracy: float
    response_length: float
    truncated: float
    groups_dropped: float
    groups_short: float
    generated_tokens: float
    prompt_tokens: float
    forward_tokens: float
    rollout_time: float
    rewards: dict[str, float]  # mean per reward component
    policy_fingerprint: int = 0  # of the weights sampled from (``RolloutBatches.fingerprint``)

    @classmethod
    def of(cls, seen: Tally, world: World, dynamic_sampling: bool, seconds: float, weights: int = 0) -> RolloutFigures:
        fields = {k: v for k, v in vars(seen).items() if k != "parts"}
        t = all_reduce_sums({**fields, **{f"part/{k}": v for k, v in seen.parts.items()}}, world)
        n = max(t["sequences"], 1.0)
        return cls(
            reward=t["reward"] / n,
            accuracy=t["correct"] / n,
            response_length=t["length"] / n,
            truncated=t["truncated"] / n,
            groups_dropped=t["dropped"] / max(t["groups"], 1.0) if dynamic_sampling else 0.0,
            groups_short=t["short"],
            generated_tokens=t["generated"],
            prompt_tokens=t["prompt_tokens"],
            forward_tokens=t["forward_tokens"],
            rollout_time=seconds,
            rewards={k: t[f"part/{k}"] / n for k in seen.parts},
            policy_fingerprint=weights,
        )

    def metrics(self) -> dict[str, float]:
        out = {k: v for k, v in vars(self).items() if k != "rewards"}
        return {**out, **{f"reward/{k}": v for k, v in self.rewards.items()}}


def updates_per_rollout(g: GRPOConfig) -> int:
    """Optimizer updates made from one rollout batch; a run may stop and resume only between them."""
    return g.iterations * g.minibatches


def prepare_policy(model) -> None:
    """Before wrapping: MTP modules get no RL gradient; freeze them (DDP and the optimizer skip them)."""
    for p in model.mtp.parameters():
        p.requires_grad_(False)


def make_reference(model) -> torch.nn.Module:
    """A frozen copy of the (unwrapped, unsharded) starting policy: on one process and under
    DDP, where every rank holds the whole model anyway (FSDP shards a second model alike)."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def token_logprobs(
    forward, input_ids: torch.Tensor, targets: torch.Tensor, micro: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(target_t | input_<=t) for every position, [B, T], float32, in chunks of ``micro``
    rows, of ``forward`` (the model, e.g. under autocast: ``anychip.train.step.Forward``) at
    the sampling ``temperature`` (logits / temperature); the same operations as the update's
    (``PolicyLoss``), so that the same rows give the same values."""
    out = []
    for start in range(0, input_ids.shape[0], micro):
        logp = log_softmax(forward(input_ids[start : start + micro]), temperature)
        out.append(logp.gather(-1, targets[start : start + micro].clamp(min=0).unsqueeze(-1)).squeeze(-1))
    return torch.cat(out)


@contextlib.contextmanager
def evaluating(model):
    """``model`` in eval mode for the block: MoE layers count no expert loads (the balancing
    bias sees only the update's tokens) and skip the balance loss, which is all that the mode
    changes in the model: its forward gives the values that training mode gives."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class RolloutBatches:
    """Minibatches of sampled, scored completions, one per optimizer update; resumable at
    rollout boundaries (``state_dict``), which is where checkpoints fall."""

    def __init__(self, g: GRPOConfig, micro_batch: int, fsdp: bool, state, source, amp: torch.dtype | None):
        """``micro_batch``: rows per forward of the update (0: a whole minibatch); ``fsdp``:
        the policy is sharded (its forwards are collectives); ``amp``: the update's autocast
        dtype (None: float32)."""
        self.state = state
        self.g = g
        self.micro_batch = micro_batch
        self.fsdp = fsdp and state.world.distributed  # the ranks sample in lockstep
        self.amp = amp
        self.source = source
        self.tokenizer = state.tokenizer
        self.world: World = state.world
        self.rewards = Rewards(self.g.rewards, source.score, self.g.max_new_tokens, self.g.overlong_buffer)
        self.stop = [self.tokenizer.encode(STOP)]
        self.cursor = 0  # prompts this rank has drawn
        self.stats = {"batches": 0, "rollouts": 0}
        self._queue: deque[dict] = deque()

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
        dev = unwrap(self.state.model).embed_tokens.weight.device
        seed = (self.g.seed * 1_000_003 + self.stats["rollouts"] * 10_007 + self.world.rank * 101 + rnd) % 2**63
        return torch.Generator(device=dev).manual_seed(seed)

    def _policy(self):
        """The training policy itself: sharded under FSDP (its forward gathers each block in
        turn); DDP's replica without the wrapper, whose forward would broadcast buffers."""
        return self.state.model if self.fsdp else unwrap(self.state.model)

    def fingerprint(self) -> int:
        """An integer that changes when any bit of the policy's weights changes (anychip.guards.sdc),
        summed over the ranks' shards under FSDP; below 2**52, so that a float keeps it exactly."""
        # state_dict, not parameters(): after a forward without backward FSDP2 leaves the root's
        # parameters gathered; its state_dict hook puts the shards back first
        value = fingerprint(unwrap(self.state.model).state_dict(keep_vars=True).values())
        if self.fsdp:
            value = int(all_reduce_sum(torch.tensor([value], dtype=torch.int64), self.world)[0])
        return value % (1 << 52)

    def _sample(
        self, examples: list[Example], rnd: int
    ) -> tuple[list[list[int]], list[list[int]], list[list[float]], list[Completion]]:
        g, tok = self.g, self.tokenizer
        prompts = [[tok.bos_id, *tok.encode(ex.prompt)] for ex in examples for _ in range(g.group_size)]
        with evaluating(self._policy()) as policy, autocast(self.state.device, self.amp):
            outs, logps = generate(
                policy,
                prompts,
                g.max_new_tokens,
                tok.eos_id,
                tok.pad_id,
                stop=self.stop,
                temperature=g.temperature,
                top_k=g.top_k,
                top_p=g.top_p,
                generator=self._sampler(rnd),
                vocab_size=tok.vocab_size,
                suppress=never_generated(tok),
                lockstep=self.world if self.fsdp else None,
                logprobs=True,
            )
        if sharded(policy):  # a forward without backward leaves the root's parameters gathered
            policy.reshard()
        completions = []
        for out in outs:
            ended = bool(out) and (out[-1] == tok.eos_id or out[-len(self.stop[0]) :] == self.stop[0])
            text = tok.decode([t for t in out if t != tok.eos_id])
            completions.append(Completion(text, len(out), truncated=not ended))
        return prompts, outs, logps, completions

    def _short_anywhere(self, short: bool) -> bool:
        """Whether this rank (or, sampling in lockstep, any rank) still needs groups."""
        if not self.fsdp:
            return short
        return bool(all_reduce_sum(torch.tensor([float(short)]), self.world)[0] > 0)

    def _rollout(self) -> list[dict]:
        g, world = self.g, self.world
        t0 = time.perf_counter()
        weights = self.fingerprint()  # nothing can be stale: this is what the rollout samples with
        want = g.prompts_per_step // world.world_size
        kept: list[Row] = []
        seen = Tally(parts=dict.fromkeys(self.rewards.weights, 0.0))
        rnd = 0
        spare: list[Row] = []  # all-equal groups, used only if the rounds run out
        while self._short_anywhere(len(kept) < want * g.group_size):
            # sampling in lockstep, a rank that has its groups draws none but joins every forward
            examples = self._prompts(want - len(kept) // g.group_size)
            self._score(examples, self._sample(examples, rnd), seen, kept, spare)
            rnd += 1
            if not g.dynamic_sampling or rnd >= g.max_sampling_rounds:
                break
        short = want * g.group_size - len(kept)
        if short:  # dynamic sampling ran out of rounds: fill with all-equal groups (zero advantage)
            kept.extend(spare[:short])
        seen.short = short // g.group_size
        self.stats["rollouts"] += 1
        batch = self._tensors(kept)
        seen.forward_tokens = batch.pop("forward_tokens")
        seconds = time.perf_counter() - t0
        batch["rollout"] = RolloutFigures.of(seen, self.world, self.g.dynamic_sampling, seconds, weights)
        return self._split(batch)

    def _score(self, examples: list[Example], sampled, seen: Tally, kept: list[Row], spare: list[Row]) -> None:
        """Reward one round's groups; keep those with a signal (all, without dynamic sampling),
        the all-equal ones in ``spare``."""
        if not examples:
            return
        g = self.g
        prompts, outs, logps, completions = sampled
        expanded = [ex for ex in examples for _ in range(g.group_size)]
        total, parts = self.rewards(expanded, completions)
        seen.count(total, parts, self.rewards.correct(expanded, completions, parts), completions, outs, prompts)
        rows = [Row(*fields) for fields in zip(expanded, prompts, outs, logps, completions, total)]
        for i in range(len(examples)):
            group = rows[i * g.group_size : (i + 1) * g.group_size]
            seen.groups += 1
            rewards = [r.reward for r in group]
            if g.dynamic_sampling and max(rewards) == min(rewards):
                seen.dropped += 1
                spare.extend(group)
                continue
            kept.extend(group)

    def _tensors(self, rows: list[Row]) -> dict:
        g, tok, world = self.g, self.tokenizer, self.world
        rewards = torch.tensor([r.reward for r in rows], dtype=torch.float32)
        std = None
        if g.advantage_scale == "batch" and world.distributed:
            moments = torch.tensor([len(rows), rewards.sum(), (rewards.double() ** 2).sum()], dtype=torch.float64)
            s = all_reduce_sum(moments, world)
            n, mean = s[0], s[1] / s[0]
            std = float(((s[2] - n * mean**2) / (n - 1).clamp(min=1)).clamp(min=0).sqrt())
        adv = group_advantages(rewards, g.group_size, g.advantage_scale, std=std)
        seqs = [r.prompt + r.completion for r in rows]
        width = max(len(s) for s in seqs) - 1
        ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        for i, (row, s) in enumerate(zip(rows, seqs)):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
            targets[i, : len(s) - 1] = torch.tensor(s[1:])
            if not (g.overlong_filter and row.scored.truncated):
                mask[i, len(row.prompt) - 1 : len(s) - 1] = 1.0  # positions that predict completion tokens
        labels = torch.where(mask.bool(), targets, torch.full_like(targets, IGNORE))
        sampler_logp = torch.zeros(len(rows), width)
        for i, row in enumerate(rows):
            sampler_logp[i, len(row.prompt) - 1 : len(row.prompt) - 1 + len(row.logp)] = torch.tensor(row.logp)
        batch = {"input_ids": ids, "labels": labels, "mask": mask, "advantages": adv, "sampler_logp": sampler_logp}
        dev = unwrap(self.state.model).embed_tokens.weight.device
        ids, targets = ids.to(dev), targets.to(dev)
        if updates_per_rollout(g) > 1:  # the policy moves between updates: keep the sampling policy's
            batch["old_logp"] = self._logprobs(self._policy(), ids, targets)
        if self.state.ref_model is not None and g.beta:
            batch["ref_logp"] = self._logprobs(self.state.ref_model, ids, targets)
        batch["forward_tokens"] = ids.numel() * (("old_logp" in batch) + ("ref_logp" in batch))
        return batch

    def _logprobs(self, model, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``model``'s log-probs of ``targets`` as the update computes the policy's: its forward
        under the same autocast, on the same rows at once (train.micro_batch of each of the
        grpo.minibatches minibatches; the rollout's padded width), in eval mode (same values)."""
        per = ids.shape[0] // self.g.minibatches
        micro = self.micro_batch or per  # the config checked that it divides a minibatch
        with evaluating(model):
            logp = token_logprobs(Forward(model, self.state.device, self.amp), ids, targets, micro, self.g.temperature)
        if sharded(model):  # a forward without backward leaves the root's parameters gathered
            model.reshard()
        return logp.cpu()

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


class ReferenceResets:
    """The reference policy becomes the current policy every ``interval`` steps
    (``grpo.ref_reset_interval``; 0: never)."""

    def __init__(self, interval: int, ref_model, model, world: World, log):
        self.interval, self.ref_model, self.model, self.world, self.log = interval, ref_model, model, world, log

    def due(self, step: int) -> bool:
        return self.ref_model is not None and bool(self.interval) and step % self.interval == 0

    @torch.no_grad()
    def reset(self, step: int) -> None:
        copy_weights(self.model, self.ref_model)
        self.log.event("reference_reset", step=step)


@torch.no_grad()
def copy_weights(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Copy every parameter and persistent buffer (the MoE balancing bias) of ``src`` into
    ``dst``, tensor by tensor: local shard to local shard when both are sharded alike (FSDP2);
    into a whole ``dst`` from a sharded ``src`` one gathered tensor at a time. Raises
    ValueError when their names differ."""
    # state_dict, not parameters(): after a forward without backward FSDP2 leaves the root's
    # parameters gathered in place of the shards; its state_dict hook puts the shards back first
    have, want = unwrap(src).state_dict(keep_vars=True), unwrap(dst).state_dict(keep_vars=True)
    if have.keys() != want.keys():
        raise ValueError(f"copy_weights: the models' tensors differ: {sorted(have.keys() ^ want.keys())[:5]}")
    for name, q in want.items():
        p = have[name]
        if hasattr(q, "to_local"):
            q.to_local().copy_(p.to_local())
        else:
            q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
