"""Batched sampling with the model's KV cache: prompts of different lengths are
left-padded, positions start at each prompt's first real token."""

from __future__ import annotations

import torch

from .models import DeepSeekV3, KVCache


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (greedy when temperature
    is 0), stopping a sequence at ``eos_id`` or when it ends with one of ``stop``.
    Only ids below ``vocab_size`` (the tokenizer's; the model's output layer may be
    larger) and not in ``suppress`` (e.g. padding) are ever chosen.
    Returns the generated tokens of each prompt (eos and stop sequence included).

    One prefill, then one token per step for every unfinished sequence; the bookkeeping
    stays on the device (no per-sequence Python work per step), and once a quarter of the
    rows in the batch have finished they are dropped from the batch and the KV cache."""
    device = model.embed_tokens.weight.device
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
    last = model.hidden_states(ids, cache=cache, attention_mask=mask[:, :width], positions=positions)[:, -1:]
    logits = model.lm_head(last)[:, -1]  # the prompt's last position only
    out = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(bsz, dtype=torch.long, device=device)
    rows = torch.arange(bsz, device=device)  # the original index of each row still in the batch
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    stops = [torch.tensor(s, dtype=torch.long, device=device) for s in stop if s]
    next_pos = positions[:, -1] + 1
    for t in range(max_new_tokens):
        if banned is not None:
            logits = logits.masked_fill(banned, float("-inf"))
        tokens = _sample(logits, temperature, top_k, top_p, generator)
        live = rows[~done]
        out[live, t] = tokens[~done]
        lengths[live] += 1
        finished = tokens == eos_id
        for s in stops:
            if t + 1 >= len(s):
                finished |= (out[rows, t + 1 - len(s) : t + 1] == s).all(dim=1)
        done = done | finished
        n_done = int(done.sum())
        if n_done == len(rows) or t == max_new_tokens - 1:
            break
        if n_done * 4 >= len(rows):  # compact: the finished rows leave the batch and the cache
            keep = (~done).nonzero().squeeze(1)
            rows, tokens, next_pos, mask = rows[keep], tokens[keep], next_pos[keep], mask[keep]
            cache.keep(keep)
            done = done[keep]
        mask[:, width + t] = (~done).long()
        tokens = tokens.masked_fill(done, pad_id)
        logits = model(
            tokens.unsqueeze(1), cache=cache, attention_mask=mask[:, : width + t + 1], positions=next_pos[:, None]
        )[:, -1]
        next_pos = next_pos + 1
    out, lengths = out.cpu(), lengths.cpu()
    return [out[i, : lengths[i]].tolist() for i in range(bsz)]
