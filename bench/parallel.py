"""Training tokens per second of the layouts anychip can apply, side by side on this
machine, for the `tiny` model (16 x 128 tokens a step, float32):

    eager                     one process, no layout option
    compile                   train.compile = true (each block, inductor)
    checkpoint block          train.activation_checkpoint = "block"
    checkpoint selective      train.activation_checkpoint = "selective"
    compile + block, compile + selective    both, in that order (checkpointing, then compile)
    fsdp 2, fsdp 4            FSDP2 over 2 / 4 processes (gloo)
    ep 2, ep 4                FSDP2 + expert parallelism over 2 / 4 processes
    hsdp 2x2 + ep 2           2 replicas x 2 shards, experts over the 2 shards

The multi-process layouts share this machine's cores (on 2 cores, 4 processes take turns):
they show what the layouts cost in communication and bookkeeping here, not what they gain
on a cluster.

Each variant is an `anychip train` run of --steps steps; the figure is the median step time
after --warmup steps (compilation happens in the first steps), reported as tokens/s and as a
ratio to eager. Runs alternate (eager, compile, ..., eager, compile, ...) --reps times.

    python bench/parallel.py [--steps 40] [--warmup 10] [--reps 2] [--only 'compile,ep 2']
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {  # name: (processes, settings)
    "eager": (1, []),
    "compile": (1, ["train.compile=true"]),
    "checkpoint block": (1, ["train.activation_checkpoint=block"]),
    "checkpoint selective": (1, ["train.activation_checkpoint=selective"]),
    "compile + block": (1, ["train.compile=true", "train.activation_checkpoint=block"]),
    "compile + selective": (1, ["train.compile=true", "train.activation_checkpoint=selective"]),
    "fsdp 2": (2, []),
    "ep 2": (2, ["parallel.ep=2"]),
    "fsdp 4": (4, []),
    "ep 4": (4, ["parallel.ep=4"]),
    "hsdp 2x2 + ep 2": (4, ["parallel.dp_replicate=2", "parallel.ep=2"]),
}


def run(nproc: int, sets: list[str], steps: int, warmup: int, run_dir: Path) -> float:
    base = [f"train.steps={steps}", "eval.n=0", "eval.interval=0", "checkpoint.interval=0", "log.tensorboard=false"]
    base += ["log.progress=false", "guards.audit_interval=0"]
    argv = [sys.executable, "-m", "anychip.cli", "train", "--nproc", str(nproc), "--run-dir", str(run_dir)]
    for item in base + sets:
        argv += ["--set", item]
    env = {**os.environ, "ANYCHIP_DEVICE": "cpu"}
    if nproc > 1:  # the cores shared out, as torchrun does
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    subprocess.run(argv, check=True, capture_output=True, text=True, env=env)
    # the step time rank 0 logs: every rank waits for the slowest in the step's collectives
    times = [json.loads(line)["step_time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(times[warmup:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--only", help="comma-separated variant names (eager is always run: the ratios need it)")
    a = p.parse_args()
    names = (
        list(VARIANTS) if a.only is None else ["eager", *(n.strip() for n in a.only.split(",") if n.strip() != "eager")]
    )
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    tokens = 16 * 128
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            for name in names:
                nproc, sets = VARIANTS[name]
                step = run(nproc, sets, a.steps, a.warmup, Path(tmp) / f"{name.replace(' ', '_')}-{rep}")
                times[name].append(step)
                print(f"  {name:<22} rep {rep}: {tokens / step:8.0f} tokens/s", flush=True)
    eager = statistics.median(times["eager"])
    print(f"tiny, 16 x 128 tokens a step, float32, {os.cpu_count()} CPU threads; medians over {a.reps} runs:")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:<22} {tokens / t:8.0f} tokens/s   {eager / t:5.2f}x eager")


if __name__ == "__main__":
    main()
