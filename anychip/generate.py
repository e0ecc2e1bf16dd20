"""Batched sampling with the model's KV cache: prompts of different lengths are
left-padded, positions start at each prompt's first real token.

A sharded model (FSDP2) gathers each block's parameters inside its forward: every forward
is a collective, so the ranks of ``lockstep`` make the same forward calls until the last
rank's sequences are done (see ``generate``)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from .models import DeepSeekV3, KVCache
from .parallel import World, all_reduce_sum


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is FSDP2-sharded: its forwards are collectives (see ``generate``'s lockstep)."""
    return isinstance(model, FSDPModule)


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = _truncate(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def _last_position_only(model: DeepSeekV3):
    """The output head sees only the last position during the prefill: the logits of a
    long prompt batch at every position would be [B, L, vocab]. The call still goes
    through the model's own ``forward``, where FSDP2 gathers the root's parameters."""
    handle = model.lm_head.register_forward_pre_hook(lambda _module, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _cache_in_compute_dtype(model: DeepSeekV3, cache: KVCache):
    """The KV cache in the dtype the blocks compute in, seen at the first block's input during
    the prefill: under FSDP2 mixed precision that is the gathered parameters' dtype (bfloat16,
    say), not that of the stored shards, and a cache of the latter would meet them in MLA's
    up-projection. (FSDP2's own hook, which casts the inputs, runs before this one.)"""

    def adopt(_module, args):
        if cache.latent.dtype != args[0].dtype:
            cache.latent, cache.k_rope = cache.latent.to(args[0].dtype), cache.k_rope.to(args[0].dtype)

    handle = model.layers[0].register_forward_pre_hook(adopt)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def generate(
    model: DeepSeekV3,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    stop: list[list[int]] = (),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    suppress: tuple[int, ...] = (),
    lockstep: World | None = None,
    logprobs: bool = False,
) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (greedy when temperature
    is 0), stopping a sequence at ``eos_id`` or when it ends with one of ``stop``.
    Only ids below ``vocab_size`` (the tokenizer's; the model's output layer may be
    larger) and not in ``suppress`` (e.g. padding) are ever chosen.
    Returns the generated tokens of each prompt (eos and stop sequence included); with
    ``logprobs``, also the log-probability of each under the model's logits at
    ``temperature`` (1 when greedy) over the whole output layer: before the excluded ids,
    top-k and top-p are cut away, the distribution a trainer's log-softmax computes, so that
    the two differ only by their numerics.

    One prefill, then one token per step for every unfinished sequence; the bookkeeping
    stays on the device (one host read per step: are any rows left?), and once a quarter of
    the rows in the batch have finished they are dropped from the batch and the KV cache.

    ``lockstep``: the ranks of a sharded model, where every forward is a collective. Each
    step they agree (one all-reduce) whether any rank has unfinished rows; a rank whose
    rows are all done, or that has no prompts at all, keeps one finished row in the batch
    and steps with it (its tokens are not recorded) until every rank is done. Every rank
    must then call ``generate`` as often, with the same ``max_new_tokens``."""
    distributed = lockstep is not None and lockstep.distributed
    if not prompts and not distributed:
        return ([], []) if logprobs else []
    real = len(prompts)
    device = model.embed_tokens.weight.device
    prompts = prompts or [[pad_id]]  # nothing to generate: one row that is done from the start
    bsz, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    mask = torch.zeros(bsz, width + max_new_tokens, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) : width] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.args, bsz, width + max_new_tokens, device=device, dtype=model.embed_tokens.weight.dtype)
    banned = None
    n_out = model.args.vocab_size
    if (vocab_size is not None and vocab_size < n_out) or suppress:
        banned = torch.zeros(n_out, dtype=torch.bool, device=device)
        if vocab_size is not None:
            banned[vocab_size:] = True
        banned[list(suppress)] = True
    with _last_position_only(model), _cache_in_compute_dtype(model, cache):
        logits = model(ids, cache=cache, attention_mask=mask[:, :width], positions=positions)[:, -1]
    out = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros(bsz, max_new_tokens, device=device) if logprobs else None
    lengths = torch.zeros(bsz, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)  # the original index of each row still in the batch
    done = torch.full((bsz,), real == 0, dtype=torch.bool, device=device)
    stops = [torch.tensor(s, dtype=torch.long, device=device) for s in stop if s]
    next_pos = positions[:, -1] + 1
    for t in range(max_new_tokens):
        if out_logp is not None:  # the model's distribution, as the trainer's log-softmax sees it
            logp = F.log_softmax(logits.float() / (temperature if temperature > 0 else 1.0), dim=-1)
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        tokens = _sample(logits, temperature, top_k, top_p, generator)
        # finished rows write what is already there (padding), without a host sync
        out[rows, t] = tokens.masked_fill(done, pad_id)
        if out_logp is not None:
            out_logp[rows, t] = logp.gather(-1, tokens[:, None]).squeeze(-1).masked_fill(done, 0.0)
        lengths[rows] += (~done).long()
        finished = tokens == eos_id
        for s in stops:
            if t + 1 >= len(s):
                finished |= (out[rows, t + 1 - len(s) : t + 1] == s).all(dim=1)
        done = done | finished
        if t == max_new_tokens - 1:
            break
        left = (~done).sum().reshape(1)
        anywhere = all_reduce_sum(left.clone(), lockstep) if distributed else left
        left, anywhere = torch.cat([left, anywhere]).tolist()  # the step's one host read
        if anywhere == 0:
            break
        n_done = len(rows) - left
        if left == 0 and len(rows) > 1:  # lockstep: one finished row keeps joining the forwards
            keep = torch.zeros(1, dtype=torch.long, device=device)
        elif left and n_done * 4 >= len(rows):  # compact: the finished rows leave the batch and the cache
            keep = (~done).nonzero().squeeze(1)
        else:
            keep = None
        if keep is not None:
            rows, tokens, next_pos, mask = rows[keep], tokens[keep], next_pos[keep], mask[keep]
            cache.keep(keep)
            done = done[keep]
        mask[:, width + t] = (~done).long()
        tokens = tokens.masked_fill(done, pad_id)
        logits = model(
            tokens.unsqueeze(1), cache=cache, attention_mask=mask[:, : width + t + 1], positions=next_pos[:, None]
        )[:, -1]
        next_pos = next_pos + 1
    out, lengths = out[:real].cpu(), lengths[:real].cpu()
    tokens_out = [out[i, : lengths[i]].tolist() for i in range(real)]
    if out_logp is None:
        return tokens_out
    out_logp = out_logp[:real].cpu()
    return tokens_out, [out_logp[i, : lengths[i]].tolist() for i in range(real)]
