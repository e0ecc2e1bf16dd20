"""Rollout throughput of anychip's batched sampler against transformers' DeepseekV3ForCausalLM.generate.

Both models get the same config, the same weights (ours -> ``save_hf`` -> ``from_pretrained``),
the same batch and the same work per call:

    B prompts (reasoning-gym arithmetic questions, ByteTokenizer bytes with bos prepended, a few
    distinct prompts each repeated as GRPO-style samples), left-padded to the longest; one prefill
    with the KV cache, then exactly --max-new-tokens sampled tokens for every sequence
    (temperature 1.0, no top-k, no top-p: softmax and torch.multinomial on float32 logits)

Early stopping is off on both sides, so every sequence generates the same number of tokens: ours
gets ``eos_id=-1`` and no stop sequence; the peer gets no eos token at all (its config's default
eos id 1 is a byte the model can sample), so it adds no logits processor either. MTP is off in
our model (``num_nextn_predict_layers=0``): neither sampler uses it. The peer runs with
``attn_implementation="sdpa"``, its fastest CPU experts implementation (``grouped_mm``),
``use_cache=True`` and, in turn, its default dynamic cache and ``cache_implementation="static"``
(see --peer-cache; generate compiles a static cache only on GPUs, and ours is not compiled
either); the faster of the two is the peer of the ratio. Timed repetitions alternate ours /
dynamic / static (ABAB...), so machine noise hits all; medians are reported. Generated tokens/s
is B x max_new_tokens over the wall time of one whole generate call, prefill included.

    python bench/rollout.py [--preset tiny] [--batch 64] [--prompts 8] [--max-new-tokens 64]
                            [--reps 5] [--warmup 1] [--dtype float32|bfloat16] [--threads N]
                            [--peer-cache both|dynamic|static] [--json PATH]

Before timing, greedy decoding (float32) of the distinct prompts on both sides must give the
same first token for every prompt, or the run aborts (not the same model). Float rounding can
flip a near-tie argmax later on, so the first position where the two part is reported rather
than required to be absent. Sampling from the same seed is compared the same way
(informational): both draw with torch.multinomial from torch's global generator, so equal
probabilities give equal tokens. Timings are only meaningful on an otherwise idle machine: on
few cores, a concurrent process can slow torch's OpenMP threads down by 10x or more; the script
warns when it sees other load or a large spread between repetitions.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import model_step  # noqa: E402  (bench/ is on sys.path when run as a script)
from model_step import busy_cores, peer_kernel_note, write_json  # noqa: E402

from anychip.data import ByteTokenizer, ReasoningTasks  # noqa: E402
from anychip.generate import generate  # noqa: E402
from anychip.models import count_parameters, preset  # noqa: E402

TASKS = ("basic_arithmetic", "chain_sum")
CACHES = ("dynamic", "static")
EXPERTS_IMPLS = ("grouped_mm", "batched_mm", "eager")  # transformers 5 implementations that run on CPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (anychip.models.PRESETS); default tiny")
    p.add_argument("--batch", type=int, default=64, help="sequences per generate call; default 64")
    p.add_argument(
        "--prompts",
        type=int,
        default=8,
        help="distinct prompts in the batch, each repeated batch/prompts times; default 8",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per sequence; default 64")
    p.add_argument("--reps", type=int, default=5, help="timed generate calls per sampler; default 5")
    p.add_argument("--warmup", type=int, default=1, help="untimed generate calls per sampler; default 1")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both models' dtype")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's default")
    p.add_argument(
        "--peer-cache",
        choices=("both", *CACHES),
        default="both",
        help="transformers cache: its default dynamic cache, cache_implementation='static', or both\n"
        "(timed in turn; the faster is the peer of the ratio); default both",
    )
    p.add_argument(
        "--peer-experts",
        default="grouped_mm",
        choices=EXPERTS_IMPLS,
        help="transformers experts_implementation; default grouped_mm (fastest on CPU)",
    )
    p.add_argument(
        "--check-tokens",
        type=int,
        default=None,
        help="greedy/sampled tokens compared before timing; default min(32, --max-new-tokens)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights, prompts and sampling seed; default 0")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    a = p.parse_args(argv)
    for name in ("batch", "prompts", "max_new_tokens", "reps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    if a.check_tokens is None:
        a.check_tokens = min(32, a.max_new_tokens)
    if a.check_tokens < 1:
        p.error("--check-tokens must be >= 1")
    return a


# ---------------------------------------------------------------------------- prompts and models


def make_prompts(n: int, seed: int, tok: ByteTokenizer) -> tuple[list[str], list[list[int]]]:
    """``n`` held-out reasoning-gym arithmetic questions (different lengths) and their ids, bos first."""
    tasks = ReasoningTasks(list(TASKS), seed=seed, split="heldout", heldout_size=max(n, len(TASKS)))
    texts = [tasks.example(i).prompt for i in range(n)]
    return texts, [[tok.bos_id, *tok.encode(t)] for t in texts]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, width], prompts right-aligned (transformers' left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def build_models(args, seed: int, experts_impl: str, tmp: Path):
    """Ours (float32, ``init_weights(seed)``) and the peer loaded from its save_hf copy (as in
    model_step.py), both in eval mode, the peer with its KV cache on."""
    ours, peer = model_step.build_models(args, seed, experts_impl, tmp)
    peer.config.use_cache = True
    # the config's default special ids (bos 0, eos 1) are bytes here: no eos, so nothing stops early
    peer.generation_config.eos_token_id = None
    peer.generation_config.bos_token_id = None
    return ours.eval(), peer.eval()


def ours_kernel_note(dtype: torch.dtype) -> str:
    """Which routed-experts path ours took: anychip caches its grouped-GEMM probe per (device, dtype)."""
    from anychip.models.deepseek import model as anychip_model

    ok = getattr(anychip_model, "_GROUPED_MM_OK", {}).get(("cpu", dtype))
    return {True: "grouped_mm (torch grouped_mm kernel)", False: "per-expert loop", None: "unknown"}[ok]


def make_samplers(ours, peer, prompts: list[list[int]], tok: ByteTokenizer, max_new: int):
    """Callables (sample: bool, seed) -> generated ids [B, max_new] for ours and each peer cache."""
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, tok.pad_id)

    def run_ours(sample: bool, seed: int, n: int = max_new) -> torch.Tensor:
        torch.manual_seed(seed)  # ours draws from the global generator too (generator=None)
        out = generate(
            ours, prompts, n, eos_id=-1, pad_id=tok.pad_id, temperature=1.0 if sample else 0.0, top_k=0, top_p=1.0
        )
        return torch.tensor(out, dtype=torch.long)

    def peer_sampler(cache: str):
        def run(sample: bool, seed: int, n: int = max_new) -> torch.Tensor:
            cfg = GenerationConfig(
                max_new_tokens=n,
                min_new_tokens=0,
                do_sample=sample,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                use_cache=True,
                cache_implementation="static" if cache == "static" else None,
                pad_token_id=tok.pad_id,
                eos_token_id=None,
                num_beams=1,
            )
            torch.manual_seed(seed)
            out = peer.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            return out[:, ids.shape[1] :]

        return run

    return run_ours, {c: peer_sampler(c) for c in CACHES}


def first_difference(a: torch.Tensor, b: torch.Tensor) -> list[int | None]:
    """Per row, the first position where a and b differ (None when equal over the shorter length)."""
    n = min(a.shape[1], b.shape[1])
    diff = a[:, :n] != b[:, :n]
    return [int(d.nonzero()[0]) if d.any() else None for d in diff]


def check_same_work(ours, peer, prompts, tok, n: int, seed: int) -> dict:
    """Greedy and same-seed sampled tokens of ours and the peer (dynamic cache) on the distinct prompts."""
    res = {"tokens_compared": n}
    for mode, sample in (("greedy", False), ("sampled", True)):
        run_ours, peers = make_samplers(ours, peer, prompts, tok, n)
        a, b = run_ours(sample, seed), peers["dynamic"](sample, seed)
        if b.shape != a.shape:
            raise SystemExit(f"ABORT: transformers generated {tuple(b.shape)} tokens, ours {tuple(a.shape)}")
        res[mode] = {"first_difference": first_difference(a, b), "ours": a.tolist(), "peer": b.tolist()}
    return res


def describe(diffs: list[int | None], n: int) -> str:
    same = sum(d is None for d in diffs)
    parted = sorted(d for d in diffs if d is not None)
    tail = f"; the others part at positions {parted}" if parted else ""
    return f"{same}/{len(diffs)} prompts identical over {n} tokens{tail}"


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    import transformers

    tok = ByteTokenizer()
    args = preset(a.preset).replace(num_nextn_predict_layers=0)
    if args.vocab_size < tok.vocab_size:
        print(f"preset {a.preset} has vocab_size {args.vocab_size} < the byte tokenizer's {tok.vocab_size}")
        return 2
    n_prompts = min(a.prompts, a.batch)
    texts, distinct = make_prompts(n_prompts, a.seed, tok)
    batch = [distinct[i * n_prompts // a.batch] for i in range(a.batch)]  # consecutive samples per prompt
    width = max(len(p) for p in batch)
    if width + a.max_new_tokens > args.max_position_embeddings:
        print(f"prompt {width} + {a.max_new_tokens} new tokens exceed max_position_embeddings")
        return 2
    caches = CACHES if a.peer_cache == "both" else (a.peer_cache,)

    torch.manual_seed(a.seed)
    busy = busy_cores()
    print(
        f"rollout: preset={a.preset} (MTP off) batch={a.batch} ({n_prompts} prompts x ~{a.batch / n_prompts:g} "
        f"samples, {min(len(p) for p in batch)}-{width} tokens with bos) max_new_tokens={a.max_new_tokens} "
        f"dtype={a.dtype} threads={torch.get_num_threads()} reps={a.reps} warmup={a.warmup}"
    )
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs")
    if busy is not None and busy > 0.25:
        print(f"WARNING: {busy:.1f} cores busy before start (other processes?): timings will be unreliable")
    total_params, act_params = count_parameters(args)

    with tempfile.TemporaryDirectory(prefix="anychip-bench-") as tmp:
        ours, peer = build_models(args, a.seed, a.peer_experts, Path(tmp))

    check = check_same_work(ours, peer, distinct, tok, a.check_tokens, a.seed)  # float32, whatever --dtype
    greedy = check["greedy"]["first_difference"]
    print(f"greedy check (float32, dynamic cache): {describe(greedy, a.check_tokens)}")
    print(f"sampled check (same seed, informational): {describe(check['sampled']['first_difference'], a.check_tokens)}")
    if any(d == 0 for d in greedy):
        bad = [texts[i] for i, d in enumerate(greedy) if d == 0]
        print(f"ABORT: the first greedy token differs for {len(bad)} prompt(s), e.g. {bad[0]!r}: not the same model")
        return 1

    if dtype != torch.float32:
        ours.to(dtype)
        peer.to(dtype)
    kernel = peer_kernel_note(peer, a.peer_experts)
    print(
        f"peer: DeepseekV3ForCausalLM.generate, attn_implementation=sdpa, experts_implementation={kernel}, "
        f"use_cache=True, cache: {' / '.join(caches)}"
    )

    run_ours, peers = make_samplers(ours, peer, batch, tok, a.max_new_tokens)
    samplers = {"ours": run_ours, **{f"transformers ({c})": peers[c] for c in caches}}
    for i in range(a.warmup):
        for fn in samplers.values():
            out = fn(True, a.seed + 1 + i)
            assert out.shape == (a.batch, a.max_new_tokens), out.shape
    gc.collect()
    gc.disable()  # no collector pauses inside the timed region
    times = {name: [] for name in samplers}
    try:
        for r in range(a.reps):  # ABAB: the same seed for every sampler within a repetition
            for name, fn in samplers.items():
                times[name].append(timed(fn, True, a.seed + 1000 + r))
    finally:
        gc.enable()
    busy_after = busy_cores(0.3)
    ours_kernel = ours_kernel_note(dtype)

    tok_per_call = a.batch * a.max_new_tokens
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "tokens_per_s": tok_per_call / med,
            "times_s": ts,
        }
    peer_name = min((n for n in rows if n != "ours"), key=lambda n: rows[n]["median_s"])
    ratio = rows["ours"]["tokens_per_s"] / rows[peer_name]["tokens_per_s"]
    paired = statistics.median(p / o for o, p in zip(times["ours"], times[peer_name], strict=True))

    print(f"params: total {total_params / 1e6:.2f}M, activated non-embedding {act_params / 1e6:.2f}M")
    print(f"{'':26}{'median s/call':>14}{'min':>8}{'max':>8}{'gen tokens/s':>14}")
    for name, r in rows.items():
        print(f"{name:26}{r['median_s']:14.4f}{r['min_s']:8.4f}{r['max_s']:8.4f}{r['tokens_per_s']:14.0f}")
    spread = max(r["max_s"] / r["min_s"] for r in rows.values())
    if spread > 1.5 or (busy_after is not None and busy_after > 0.25):
        print(
            f"WARNING: max/min call time {spread:.2f}x, {busy_after or 0:.1f} cores busy after the run "
            "(other processes?): noisy machine, rerun on an idle one"
        )
    print(f"ours: anychip.generate, routed experts via {ours_kernel}; peer: {peer_name}")
    print(f"paired ratio (median over repetitions of peer time / our time): {paired:.2f}x")
    print(f"ratio ours/transformers generated tokens/s: {ratio:.2f}x")

    if a.json:
        out = {
            "config": {
                **vars(a),
                "threads": torch.get_num_threads(),
                "prompts": n_prompts,
                "generated_tokens_per_call": tok_per_call,
                "prompt_width": width,
            },
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "peer": {
                "attn_implementation": "sdpa",
                "experts_implementation": a.peer_experts,
                "kernel": kernel,
                "caches": list(caches),
                "fastest": peer_name,
            },
            "ours": {"routed_experts": ours_kernel},
            "prompts": texts,
            "check": check,
            "params": {"total": total_params, "activated_non_embedding": act_params},
            "rows": rows,
            "ratio_tokens_per_s": ratio,
            "paired_ratio": paired,
            "busy_cores_before": busy,
            "busy_cores_after": busy_after,
        }
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
