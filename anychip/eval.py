"""Held-out accuracy: greedy decoding (or pass@1 averaged over sampled completions, as
DeepSeek-R1 reports it) with the KV cache on generated problems, scored by the task's own
verifier (reasoning-gym). And the held-out loss that training measures every
``eval.interval`` steps."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .data import Example, score
from .generate import generate
from .models import DeepSeekV3
from .parallel import World, all_reduce_sum, unwrap

STOP = "</answer>"


class HeldoutLoss:
    """The held-out loss training measures every ``interval`` steps and at the last one,
    on fixed ``batches`` (this rank's rows; none: never, e.g. in GRPO runs)."""

    def __init__(self, interval: int, last_step: int, batches: list[dict], micro: int, amp, device_type: str, world):
        self.interval, self.last_step, self.batches = interval, last_step, batches
        self.micro, self.amp, self.device_type, self.world = micro, amp, device_type, world

    def on_schedule(self, step: int) -> bool:
        """Whether ``step`` is a measuring step (with or without batches to measure on)."""
        return bool(self.interval) and (step % self.interval == 0 or step == self.last_step)

    def due(self, step: int) -> bool:
        return bool(self.batches) and self.on_schedule(step)

    def __call__(self, model) -> float:
        return heldout_loss(model, self.batches, self.micro, self.amp, self.device_type, self.world)


@torch.no_grad()
def heldout_loss(model, batches: list[dict], micro: int, amp, device_type: str, world) -> float:
    """Next-token loss of the main model (no MTP term) per label token over fixed held-out
    batches, all ranks' rows together. Eval mode: expert loads are not counted, so the
    balancing bias and the trajectory are the same with or without it."""
    dev = unwrap(model).embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    autocast = torch.autocast(device_type, dtype=amp) if amp is not None else contextlib.nullcontext()
    try:
        for batch in batches:
            for start in range(0, batch["input_ids"].shape[0], micro):
                x = batch["input_ids"][start : start + micro].to(dev)
                y = batch["labels"][start : start + micro].to(dev)
                with autocast:
                    out = model(x, labels=y, reduction="sum")
                total += torch.tensor([out.lm_loss.item(), out.num_tokens.item()], dtype=torch.float64)
    finally:
        model.train(was_training)
    total = all_reduce_sum(total, world)
    return total[0].item() / max(total[1].item(), 1.0)


@dataclass
class EvalResult:
    correct: float  # sum of the verifier's scores (some tasks give partial credit), over samples per problem
    n: int  # problems
    samples: list[dict] = field(default_factory=list)  # a few (prompt, output, answer, score) for reading
    exact: float = 0.0  # completions scored 1.0, over samples per problem

    @property
    def accuracy(self) -> float:
        """Mean score per problem (pass@1; averaged over the samples when sampling)."""
        return self.correct / self.n if self.n else 0.0

    @property
    def exact_accuracy(self) -> float:
        return self.exact / self.n if self.n else 0.0


def evaluate(
    model: DeepSeekV3,
    tokenizer,
    examples: list[Example],
    max_new_tokens: int = 48,
    batch_size: int = 50,
    samples_per_problem: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    lockstep: World | None = None,
) -> EvalResult:
    """Decode a completion for every example's prompt and score it: greedy by default;
    with ``temperature`` > 0, ``samples_per_problem`` sampled completions per problem whose
    scores are averaged (pass@1 as in DeepSeek-R1's evaluation). The model is put in eval
    mode for the call and restored afterwards.

    ``lockstep``: the ranks of a sharded (FSDP2) model, each scoring its own ``examples``;
    they decode batch by batch together (``generate``), a rank with fewer batches stepping
    with an empty one, so every rank must call ``evaluate``."""
    was_training = model.training
    model.eval()
    stop = [tokenizer.encode(STOP)]
    k = samples_per_problem if temperature > 0 else 1
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    correct, exact, samples = 0.0, 0.0, []
    todo = [ex for ex in examples for _ in range(k)]
    batches = torch.tensor([-(-len(todo) // batch_size)])
    if lockstep is not None and lockstep.distributed:  # every rank decodes as many batches
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)
    batches = int(batches)
    try:
        for start in range(0, batches * batch_size, batch_size):
            chunk = todo[start : start + batch_size]
            prompts = [[tokenizer.bos_id, *tokenizer.encode(ex.prompt)] for ex in chunk]
            outs = generate(
                model,
                prompts,
                max_new_tokens,
                tokenizer.eos_id,
                tokenizer.pad_id,
                stop=stop,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
                vocab_size=tokenizer.vocab_size,
                suppress=never_generated(tokenizer),
                lockstep=lockstep,
            )
            for ex, out in zip(chunk, outs):
                text = tokenizer.decode(out)
                s = float(score(ex, text))
                correct += s / k
                exact += float(s >= 1.0) / k
                if len(samples) < 5:
                    samples.append({"prompt": ex.prompt, "output": text, "answer": ex.answer, "score": s})
    finally:
        model.train(was_training)
    return EvalResult(correct, len(examples), samples, exact)


def never_generated(tokenizer) -> tuple[int, ...]:
    """Padding and beginning-of-sequence ids (unless one is also the eos)."""
    return tuple({tokenizer.pad_id, tokenizer.bos_id} - {tokenizer.eos_id, None})


def shard(items: list, rank: int, world_size: int) -> list:
    """Every world_size-th item starting at rank: each rank scores a disjoint part."""
    return items[rank::world_size]


def reduce_result(result: EvalResult, world) -> EvalResult:
    """Sum correct and n over ranks (samples stay rank 0's)."""
    t = torch.tensor([result.correct, float(result.n), result.exact], dtype=torch.float64)
    all_reduce_sum(t, world)
    return EvalResult(t[0].item(), int(t[1].item()), result.samples, t[2].item())
