"""Training-step throughput of anychip's DeepSeek-V3 against transformers' DeepseekV3ForCausalLM.

Both models get the same config, the same weights (ours -> ``save_hf`` -> ``from_pretrained``),
the same batch and the same work per step:

    zero_grad(set_to_none=True); logits = model(input_ids)
    loss = F.cross_entropy(logits.float(), labels); loss.backward()

(forward + backward, no optimizer step). MTP is off in our model (``num_nextn_predict_layers=0``)
because DeepseekV3ForCausalLM does not train it, and the loss is computed here, identically for
both, on the logits in float32. The peer runs with ``attn_implementation="sdpa"`` and its fastest
CPU experts implementation (``grouped_mm``, see --peer-experts). Timed repetitions alternate
ours / peer (ABAB...), so machine noise hits both; medians are reported.

    python bench/model_step.py [--preset tiny] [--batch 8] [--seq 256] [--steps 10] [--warmup 3]
                               [--dtype float32|bfloat16] [--threads N] [--json PATH]

The run aborts if the two losses on the batch differ by more than 1e-4 in float32 (the
comparison would then not be the same work). Timings are only meaningful on an otherwise idle
machine: on few cores, a concurrent process can slow torch's OpenMP threads down by 10x or more;
the script warns when it sees other load or a large spread between repetitions.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from anychip.models import DeepSeekV3, count_parameters, preset, save_hf, training_flops_per_token  # noqa: E402

LOSS_TOL = 1e-4  # float32 |loss_ours - loss_peer|
GRAD_TOL = 1e-3  # float32, max |grad difference| relative to max |grad|, embedding and output head
EXPERTS_IMPLS = ("grouped_mm", "batched_mm", "eager")  # transformers 5 implementations that run on CPU


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", help="model preset (anychip.models.PRESETS); default tiny")
    p.add_argument("--batch", type=int, default=8, help="sequences per step; default 8")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence; default 256")
    p.add_argument("--steps", type=int, default=10, help="timed repetitions per model; default 10")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions per model; default 3")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="both models' dtype")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads; default: torch's default")
    p.add_argument(
        "--peer-experts",
        default="grouped_mm",
        choices=(*EXPERTS_IMPLS, "auto"),
        help="transformers experts_implementation; default grouped_mm (fastest on CPU: batched_mm gathers a\n"
        "weight copy per token-expert pair, eager loops over experts with one-hot masks). 'auto' times\n"
        "one step of each and keeps the fastest (slow: batched_mm takes ~10-20 s a step on tiny)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights and batch seed; default 0")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    a = p.parse_args(argv)
    for name in ("batch", "seq", "steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    return a


# ---------------------------------------------------------------------------- machine


def write_json(path: str, out: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def busy_cores(window: float = 0.5) -> float | None:
    """Cores kept busy by anything (mostly other processes, as we sleep) over ``window`` s; None off Linux."""

    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = snap()
        time.sleep(window)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(t1 - t0, 1)) * (os.cpu_count() or 1)


def peak_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of an n x n @ n x n matmul in ``dtype`` (the measured peak for MFU)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------- models


def build_models(args, seed: int, experts_impl: str, tmp: Path):
    """Ours (float32, ``init_weights(seed)``) and the peer loaded from its save_hf copy."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ours = DeepSeekV3(args)
    ours.init_weights(seed=seed)
    save_hf(ours, tmp / "hf")
    peer = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp / "hf", attn_implementation="sdpa", experts_implementation=experts_impl, dtype=torch.float32
    )
    peer.config.use_cache = False
    return ours.train(), peer.train()


def peer_kernel_note(peer, impl: str) -> str:
    """Whether transformers' grouped_mm path reaches torch's kernel or its per-expert fallback loop."""
    if impl != "grouped_mm":
        return impl
    from transformers.integrations import moe

    exp = next(m for m in peer.modules() if type(m).__name__ == "DeepseekV3Experts")
    x = torch.zeros(4, exp.gate_up_proj.shape[-1], dtype=exp.gate_up_proj.dtype)
    offs = torch.tensor([4] * exp.gate_up_proj.shape[0], dtype=torch.int32)
    native = moe._can_use_grouped_mm(x, exp.gate_up_proj.transpose(-2, -1), offs)
    return "grouped_mm (torch grouped_mm kernel)" if native else "grouped_mm (transformers fallback loop)"


def make_steps(ours, peer, input_ids, labels):
    def loss_of(logits):
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def step_ours():
        ours.zero_grad(set_to_none=True)
        loss = loss_of(ours(input_ids))
        loss.backward()
        return loss

    def step_peer():
        peer.zero_grad(set_to_none=True)
        loss = loss_of(peer(input_ids=input_ids, use_cache=False).logits)
        loss.backward()
        return loss

    return step_ours, step_peer


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def check_same_work(step_ours, step_peer, ours, peer) -> dict:
    """One float32 step of each: losses within LOSS_TOL, embedding/head gradients within GRAD_TOL."""
    lo, lp = step_ours().item(), step_peer().item()
    res = {"loss_ours": lo, "loss_peer": lp, "loss_abs_diff": abs(lo - lp)}
    for name, a, b in (
        ("embed", ours.embed_tokens.weight.grad, peer.model.embed_tokens.weight.grad),
        ("lm_head", ours.lm_head.weight.grad, peer.lm_head.weight.grad),
    ):
        res[f"grad_{name}_rel_diff"] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return res


def pick_experts_impl(peer, step_peer) -> tuple[str, dict]:
    times = {}
    for impl in EXPERTS_IMPLS:
        peer.set_experts_implementation(impl)
        step_peer()  # warm-up
        times[impl] = timed(step_peer)
        print(f"  experts_implementation={impl}: {times[impl]:.3f} s/step", flush=True)
    best = min(times, key=times.get)
    peer.set_experts_implementation(best)
    return best, times


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    import transformers

    args = preset(a.preset).replace(num_nextn_predict_layers=0)
    if a.seq > args.max_position_embeddings:
        print(f"--seq {a.seq} exceeds the preset's max_position_embeddings {args.max_position_embeddings}")
        return 2
    torch.manual_seed(a.seed)
    busy = busy_cores()
    print(
        f"model_step: preset={a.preset} (MTP off) batch={a.batch} seq={a.seq} dtype={a.dtype} "
        f"threads={torch.get_num_threads()} steps={a.steps} warmup={a.warmup}"
    )
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs")
    if busy is not None and busy > 0.25:
        print(f"WARNING: {busy:.1f} cores busy before start (other processes?): timings will be unreliable")

    peak = peak_flops(dtype)
    fpt, fpt_dense, fpt_attn = training_flops_per_token(args, a.seq)
    total_params, act_params = count_parameters(args)

    g = torch.Generator().manual_seed(a.seed + 1)
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq + 1), generator=g)
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    impl = "grouped_mm" if a.peer_experts == "auto" else a.peer_experts
    with tempfile.TemporaryDirectory(prefix="anychip-bench-") as tmp:
        ours, peer = build_models(args, a.seed, impl, Path(tmp))
    step_ours, step_peer = make_steps(ours, peer, input_ids, labels)

    check = check_same_work(step_ours, step_peer, ours, peer)  # float32, whatever --dtype
    print(
        f"loss check (float32): ours {check['loss_ours']:.6f}  transformers {check['loss_peer']:.6f}  "
        f"|diff| {check['loss_abs_diff']:.2e}  grad rel diff embed {check['grad_embed_rel_diff']:.1e} "
        f"lm_head {check['grad_lm_head_rel_diff']:.1e}"
    )
    bad = (
        check["loss_abs_diff"] > LOSS_TOL
        or max(check["grad_embed_rel_diff"], check["grad_lm_head_rel_diff"]) > GRAD_TOL
    )
    if bad or not (math.isfinite(check["loss_ours"]) and math.isfinite(check["loss_peer"])):
        print(f"ABORT: the models disagree (loss tol {LOSS_TOL}, grad tol {GRAD_TOL}): not the same work")
        return 1

    impl_times = None
    if a.peer_experts == "auto":
        print("choosing the peer's experts_implementation (one timed step each):")
        impl, impl_times = pick_experts_impl(peer, step_peer)

    if dtype != torch.float32:
        ours.to(dtype)
        peer.to(dtype)
        lo, lp = step_ours().item(), step_peer().item()
        print(f"loss ({a.dtype}): ours {lo:.4f}  transformers {lp:.4f}  (informational)")
    kernel = peer_kernel_note(peer, impl)
    print(f"peer: DeepseekV3ForCausalLM, attn_implementation=sdpa, experts_implementation={kernel}")

    for _ in range(a.warmup):
        step_ours()
        step_peer()
    gc.collect()
    gc.disable()  # no collector pauses inside the timed region (autograd graphs are freed by refcount)
    t_ours, t_peer = [], []
    try:
        for _ in range(a.steps):  # ABAB
            t_ours.append(timed(step_ours))
            t_peer.append(timed(step_peer))
    finally:
        gc.enable()
    busy_after = busy_cores(0.3)

    tok = a.batch * a.seq
    rows = {}
    for name, ts in (("ours", t_ours), ("transformers", t_peer)):
        med = statistics.median(ts)
        rows[name] = {
            "median_s": med,
            "min_s": min(ts),
            "max_s": max(ts),
            "tokens_per_s": tok / med,
            "mfu": tok / med * fpt / peak,
            "times_s": ts,
        }
    ratio = rows["ours"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    paired = statistics.median(p / o for o, p in zip(t_ours, t_peer, strict=True))

    print(
        f"params: total {total_params / 1e6:.2f}M, activated non-embedding {act_params / 1e6:.2f}M; "
        f"FLOPs/token {fpt / 1e6:.1f}M (6N {fpt_dense / 1e6:.1f}M + attention {fpt_attn / 1e6:.1f}M)"
    )
    print(f"peak: {peak / 1e9:.1f} GFLOP/s ({a.dtype} 2048^3 matmul, best of 5)")
    print(f"{'':14}{'median s/step':>14}{'min':>8}{'max':>8}{'tokens/s':>11}{'MFU':>8}")
    for name, r in rows.items():
        print(
            f"{name:14}{r['median_s']:14.4f}{r['min_s']:8.4f}{r['max_s']:8.4f}"
            f"{r['tokens_per_s']:11.0f}{r['mfu'] * 100:7.1f}%"
        )
    spread = max(r["max_s"] / r["min_s"] for r in rows.values())
    if spread > 1.5 or (busy_after is not None and busy_after > 0.25):
        print(
            f"WARNING: max/min step time {spread:.2f}x, {busy_after or 0:.1f} cores busy after the run "
            "(other processes?): noisy machine, rerun on an idle one"
        )
    print(f"paired ratio (median over repetitions of peer time / our time): {paired:.2f}x")
    print(f"ratio ours/transformers tokens/s: {ratio:.2f}x")

    if a.json:
        out = {
            "config": {**vars(a), "threads": torch.get_num_threads(), "tokens_per_step": tok},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "peer": {
                "attn_implementation": "sdpa",
                "experts_implementation": impl,
                "kernel": kernel,
                "experts_step_s": impl_times,
            },
            "check": check,
            "params": {"total": total_params, "activated_non_embedding": act_params},
            "flops_per_token": {"total": fpt, "dense_6n": fpt_dense, "attention": fpt_attn},
            "peak_flops": peak,
            "ours": rows["ours"],
            "transformers": rows["transformers"],
            "ratio_tokens_per_s": ratio,
            "paired_ratio": paired,
            "busy_cores_before": busy,
            "busy_cores_after": busy_after,
        }
        write_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
