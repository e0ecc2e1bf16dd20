"""Training throughput of `anychip train` against a plain loop of transformers'
DeepseekV3ForCausalLM with torch AdamW: same config, weights, batches, optimizer
settings, learning-rate schedule and gradient clipping, interleaved step by step in one
run.

How the interleaving works: anychip's own loop runs (``anychip.train.loop.train``), and
its ``after_step`` hook runs one peer step on the very batch anychip just trained on.
anychip's step time (``metrics.jsonl`` ``step_time``: data, forward, backward, clip,
optimizer, balancing update) excludes the hook, so each side is timed on its own work
while machine noise hits both alike.

Same work: MTP is off in anychip's model (the peer does not train it); both compute
cross-entropy over the same label tokens in float32 logits; both use AdamW with the
same betas, weight decay, fused kernels where the device has them, the same warmup +
cosine schedule and the same clip norm. The peer runs with SDPA attention and its
grouped-GEMM experts (its fastest CPU settings). The peer's data is pre-made by
anychip's loader, so its time has no data cost: a slight advantage to the peer.

    python bench/train_throughput.py [--steps 30] [--warmup 5] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anychip.config import load_config  # noqa: E402
from anychip.models import save_hf, training_flops_per_token  # noqa: E402
from anychip.train.hooks import Hooks  # noqa: E402
from anychip.train.loop import train  # noqa: E402
from anychip.train.optim import lr_at  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the medians")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    sets = [
        f"train.steps={a.steps}",
        "model.num_nextn_predict_layers=0",
        "eval.n=0",
        "log.tensorboard=false",
        "log.progress=false",
        "device.type=cpu",
        *a.sets,
    ]
    cfg = load_config(None, sets)
    tmp = Path(tempfile.mkdtemp(prefix="anychip-bench-"))
    peer: dict = {}
    peer_times: list[float] = []
    loss_pairs: list[tuple[float, float]] = []

    def start_peer(state):
        save_hf(state.model, tmp / "hf")
        model = transformers.DeepseekV3ForCausalLM.from_pretrained(
            tmp / "hf", attn_implementation="sdpa", experts_implementation="grouped_mm", dtype=torch.float32
        ).train()
        model.config.use_cache = False
        t = cfg.train
        decay = [q for n, q in model.named_parameters() if q.ndim >= 2 and "embed_tokens" not in n]
        other = [q for n, q in model.named_parameters() if not (q.ndim >= 2 and "embed_tokens" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": other, "weight_decay": 0.0}],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            fused=state.device.fused_adamw() or None,
        )
        peer.update(model=model, opt=opt)

    def peer_step(state):
        model, opt, batch = peer["model"], peer["opt"], state.batch
        t0 = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(state.step, cfg.train)
        opt.step()
        opt.zero_grad(set_to_none=True)
        peer_times.append(time.perf_counter() - t0)
        loss_pairs.append((state.metrics["loss"], loss.item()))

    hooks = Hooks()
    hooks.add("on_start", start_peer)
    hooks.add("after_step", peer_step)
    run_dir = tmp / "run"
    state = train(cfg, run_dir, hooks)
    import json

    ours = [json.loads(line)["step_time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ours, theirs = ours[a.warmup :], peer_times[a.warmup :]
    tokens = cfg.train.global_batch * cfg.train.seq_len
    t_ours, t_peer = statistics.median(ours), statistics.median(theirs)
    peak = state.device.peak_flops(torch.float32)
    fpt, _, _ = training_flops_per_token(state.model.args, cfg.train.seq_len)
    print(
        f"train_throughput: {cfg.model.preset} (MTP off), global batch {cfg.train.global_batch} x "
        f"{cfg.train.seq_len}, {cfg.train.mode}, {a.steps} steps ({a.warmup} warm-up), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(f"first-step losses: anychip {loss_pairs[0][0]:.6f}  transformers {loss_pairs[0][1]:.6f}")
    print(f"last-step losses:  anychip {loss_pairs[-1][0]:.6f}  transformers {loss_pairs[-1][1]:.6f}")
    print(f"peak (measured, float32 matmul): {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {fpt / 1e6:.1f}M")
    print(f"{'':16}{'median s/step':>14}{'tokens/s':>11}{'MFU':>8}")
    for name, t in (("anychip", t_ours), ("transformers", t_peer)):
        print(f"{name:16}{t:>14.4f}{tokens / t:>11,.0f}{100 * fpt * tokens / t / peak:>7.1f}%")
    print(f"ratio anychip/transformers tokens/s: {t_peer / t_ours:.2f}x")
    if abs(loss_pairs[0][0] - loss_pairs[0][1]) > 1e-3:
        print("WARNING: first-step losses differ: the two sides are not doing the same work")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
