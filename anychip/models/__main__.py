"""`python -m anychip.models`: the model family at a glance.

Prints the named sizes with their parameter counts (on the meta device), trains the
``tiny`` preset for a few steps on counting sequences (loss, MTP loss and expert
balance shown as it goes), writes it in Hugging Face format, reads it back and decodes
with the KV cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from . import PRESETS, KVCache, count_parameters, load_hf, preset, save_hf
from .deepseek import DeepSeekV3


def counting_batch(gen: torch.Generator, vocab: int, batch: int, seqlen: int) -> torch.Tensor:
    """Sequences start, start+step, start+2*step, ... (mod vocab): learnable, verifiable."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    step = torch.randint(1, 4, (batch, 1), generator=gen)
    return (start + step * torch.arange(seqlen + 1)) % vocab


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m anychip.models", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)

    print(f"{'preset':<9}{'total':>17}{'activated':>17}{'with MTP':>17}")
    for name, args in PRESETS.items():
        total, active = count_parameters(args)
        with_mtp, _ = count_parameters(args, include_mtp=True)
        print(f"{name:<9}{total:>17,}{active:>17,}{with_mtp:>17,}")

    torch.manual_seed(opts.seed)
    args = preset("tiny")
    model = DeepSeekV3(args)
    model.init_weights(seed=opts.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(opts.seed)
    print(f"\ntraining tiny ({sum(p.numel() for p in model.parameters()):,} parameters) on counting sequences")
    t0 = time.perf_counter()
    for step in range(1, opts.steps + 1):
        seq = counting_batch(gen, args.vocab_size, opts.batch, opts.seq)
        out = model.loss(seq[:, :-1], seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        loads = model.expert_loads()
        model.update_balancing_bias()
        if step == 1 or step % 10 == 0:
            imbalance = (loads.max(dim=1).values / loads.mean(dim=1)).max().item()
            print(
                f"step {step:4d}  loss {out.loss.item():.3f}  lm {out.lm_loss.item():.3f}  "
                f"mtp {out.mtp_losses[0].item():.3f}  max/mean expert load {imbalance:.2f}  "
                f"{time.perf_counter() - t0:.0f}s"
            )

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, f"{tmp}/tiny-hf")
        again = load_hf(f"{tmp}/tiny-hf").eval()
    model.eval()
    prompt = counting_batch(gen, args.vocab_size, 1, 8)[:, :8]
    cache = KVCache(args, batch_size=1, max_len=24)
    tokens = prompt
    with torch.no_grad():
        logits = again(prompt, cache=cache)
        for _ in range(16):
            nxt = logits[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, nxt], dim=1)
            logits = again(nxt, cache=cache)
        same = torch.equal(model(tokens[:, :-1]).argmax(-1)[:, 7:], tokens[:, 8:])
    print(f"\nHF round trip + KV-cache greedy decode: prompt {prompt[0].tolist()}")
    print(f"continuation {tokens[0, 8:].tolist()}  (matches full-forward argmax: {same})")


if __name__ == "__main__":
    main()
