"""Pools on this machine: `tiny`, 2 pools of one process each (per-step sync) against one job
of the same global batch and processes (2 processes, DDP), without and with a pool lost every
N steps (`--chaos pool_loss@N:1,pool_loss@2N:0,...`, the pools in turn); all in one run.

    python bench/pools.py [--steps 120] [--every 30] [--batch 8] [--seq 64] [--timeout 5]

Printed: tokens/s of the whole run (tokens trained by every pool over the wall time from the
first to the last step; a step without a pool trains the others' shares only) and its ratio
to the one job; per loss, the time from the pool's death (its
launcher's record) to the next step of the other pool, and to the lost pool's return (the
live pool's state taken); the time without a pool; the fleet's goodput (`anychip goodput`).
Targets: the surviving pool's next step within 15 s of a loss, the lost pool back within 30 s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaos_soak import train  # noqa: E402  (bench/ is on the path of a script run from it)

from anychip.events import read_jsonl  # noqa: E402
from anychip.pools.timeline import timeline  # noqa: E402


def tokens_per_s(metrics_dirs: list[Path], tokens_per_step: int) -> float:
    """Tokens trained over the wall time from the first step's start to the last's end: each
    directory's (a pool's, or the job's) distinct steps, each of ``tokens_per_step`` (its share
    of the global batch: while a pool is lost, a step trains the other pools' shares only)."""
    metrics = {d: read_jsonl(d / "metrics.jsonl") for d in metrics_dirs}
    steps = sum(len({m["step"] for m in ms}) for ms in metrics.values())
    start = min(m["time"] - m["step_time"] for ms in metrics.values() for m in ms)
    end = max(m["time"] for ms in metrics.values() for m in ms)
    return steps * tokens_per_step / (end - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=30, help="a pool lost every this many steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--timeout", type=float, default=5.0, help="pools.timeout_s")
    a = p.parse_args()
    common = [
        "model.preset=tiny",
        f"train.steps={a.steps}",
        f"train.global_batch={a.batch}",
        f"train.seq_len={a.seq}",
        "train.mode=pretrain",
        "eval.interval=0",
        "eval.n=0",
        "checkpoint.interval=20",
        "log.tensorboard=false",
        "device.type=cpu",
        f"pools.timeout_s={a.timeout}",
    ]
    tokens = a.batch * a.seq
    losses = [f"pool_loss@{s}:{i % 2 ^ 1}" for i, s in enumerate(range(a.every, a.steps, a.every))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wall_job = train(tmp / "job", [*common, "parallel.strategy=ddp"], "--nproc", "2")
        job = tokens_per_s([tmp / "job"], tokens)
        wall_pools = train(tmp / "pools", common, "--pools", "2")
        clean = tokens_per_s([tmp / "pools" / f"pool{i}" for i in range(2)], tokens // 2)
        wall_lossy = train(tmp / "lossy", common, "--pools", "2", "--chaos", ",".join(losses))
        lossy = tokens_per_s([tmp / "lossy" / f"pool{i}" for i in range(2)], tokens // 2)
        t = timeline(tmp / "lossy")
        clean_t = timeline(tmp / "pools")
    print(
        f"tiny, {a.steps} steps of {a.batch} x {a.seq} tokens, CPU, 1 thread per process, pools.timeout_s = {a.timeout:g}"
    )
    print(f"  1 job, 2 processes (DDP):   {job:8.0f} tokens/s  (command wall {wall_job:.1f} s)")
    print(
        f"  2 pools, per-step sync:     {clean:8.0f} tokens/s  ratio {clean / job:.2f}  (command wall {wall_pools:.1f} s)"
    )
    print(
        f"  2 pools, {len(losses)} pools lost:     {lossy:8.0f} tokens/s  ratio {lossy / job:.2f}  "
        f"(command wall {wall_lossy:.1f} s; {', '.join(losses)})"
    )
    nxt = [x["next_step_s"] for x in t.losses if x["next_step_s"] is not None]
    back = [x["rejoin_s"] for x in t.losses if x["rejoin_s"] is not None]
    first = [x["first_step_s"] for x in t.losses if x["first_step_s"] is not None]
    if nxt:
        print(
            f"  loss -> other pool's next step: median {statistics.median(nxt):.2f} s, max {max(nxt):.2f} s (target 15 s)"
        )
    if back:
        print(
            f"  loss -> lost pool back (state taken): median {statistics.median(back):.2f} s, max {max(back):.2f} s "
            f"(target 30 s); -> its first step: median {statistics.median(first):.2f} s"
        )
    print(f"  time without a pool: {t.without_s:.1f} s of {t.end - t.start:.1f} s")
    print(f"  fleet goodput: {100 * clean_t.fleet_goodput:.1f}% without losses, {100 * t.fleet_goodput:.1f}% with")
    for loss in t.losses:
        print(f"    {loss}")


if __name__ == "__main__":
    main()
