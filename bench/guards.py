"""Cost of the guards, on this machine, in one run (tiny, the demo's batch of 16 x 128):

1. Accounting inside one guarded run: the time spent in the guards' verdicts and their
   per-step agreement (``Guards.judge``), in the heartbeat's hooks, in the checkpoint's non-finite check and in the extra step-0
   checkpoint, as a share of the run's training time. Exact, and immune to the machine's
   run-to-run noise (on 2 cores: +-10% between identical runs).
2. End to end: `anychip train` with every guard on at its default intervals against every
   guard off, runs alternating (on, off, on, off, ...); training tokens per second of the
   whole loop (`train_time_s` of the run_end event), medians.

    python bench/guards.py [--steps 200] [--reps 3] [--nproc 1]

With --nproc 2 the runs use DDP over 2 processes (gloo), where the per-step agreement
collective, the replica fingerprints and the straggler measurement are also on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OFF = [
    "guards.nonfinite=false",
    "guards.spike=false",
    "guards.watchdog=false",
    "guards.audit_interval=0",
    "guards.replica_check_interval=0",
    "guards.straggler_interval=0",
]


def run(run_dir: Path, steps: int, nproc: int, guards: bool) -> dict:
    sets = [
        f"train.steps={steps}",
        "eval.n=0",
        "log.tensorboard=false",
        "log.progress=false",
        "train.log_interval=100000",
        "device.type=cpu",
        "parallel.max_restarts=0",
        f"parallel.nproc={nproc}",
        "parallel.strategy=ddp",
        *([] if guards else OFF),
    ]
    cmd = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "run_end")
    tokens = steps * 16 * 128
    installed = next(e for e in events if e["event"] == "guards")["installed"]
    return {"tokens_per_s": tokens / end["train_time_s"], "installed": installed}


def accounting(steps: int) -> dict:
    """One guarded run in this process with every guard hook, the agreement and the
    checkpoint's finite check timed."""
    import anychip.checkpoint as ckpt
    import anychip.guards.setup as guard_setup
    import anychip.train.loop as loop
    from anychip.config import load_config
    from anychip.train.hooks import Hooks

    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    class TimedHooks(Hooks):  # only the watchdog's heartbeat registers hooks in this run
        def __call__(self, point, state):
            t0 = time.perf_counter()
            super().__call__(point, state)
            spent[f"hooks.{point}"] = spent.get(f"hooks.{point}", 0.0) + time.perf_counter() - t0

    real_judge, real_check = guard_setup.Guards.judge, ckpt._nonfinite
    guard_setup.Guards.judge = timed("guards (verdicts and agreement)", real_judge)
    ckpt._nonfinite = timed("checkpoint finite check", real_check)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sets = [f"train.steps={steps}", "eval.n=0", "log.tensorboard=false", "log.progress=false"]
            sets += ["train.log_interval=100000", "device.type=cpu"]
            cfg = load_config(None, sets)
            loop.train(cfg, Path(tmp) / "run", TimedHooks())
            events = [json.loads(line) for line in (Path(tmp) / "run" / "events.jsonl").read_text().splitlines()]
    finally:
        guard_setup.Guards.judge, ckpt._nonfinite = real_judge, real_check
    end = next(e for e in events if e["event"] == "run_end")
    spent["step-0 checkpoint (save call)"] = next(
        e["stall_s"] for e in events if e["event"] == "checkpoint_save" and e["step"] == 0
    )
    return {"train_time_s": end["train_time_s"], "spent": spent}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--nproc", type=int, default=1)
    a = p.parse_args()
    acc = accounting(a.steps)
    total = sum(acc["spent"].values())
    print(f"1. inside one guarded run of {a.steps} steps ({acc['train_time_s']:.1f} s of training):")
    for name, t in sorted(acc["spent"].items(), key=lambda kv: -kv[1]):
        print(f"   {name:<32}{1e3 * t:9.1f} ms  {100 * t / acc['train_time_s']:6.3f}%")
    print(f"   {'all guards':<32}{1e3 * total:9.1f} ms  {100 * total / acc['train_time_s']:6.3f}%  (target <= 3%)")
    print("2. end to end, alternating runs:", flush=True)
    results: dict[str, list[float]] = {"on": [], "off": []}
    installed = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.reps):
            for mode in ("on", "off"):
                r = run(Path(tmp) / f"{mode}{i}", a.steps, a.nproc, mode == "on")
                results[mode].append(r["tokens_per_s"])
                if mode == "on":
                    installed = r["installed"]
                print(f"  rep {i} guards {mode:3s}: {r['tokens_per_s']:,.0f} tok/s", flush=True)
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    print(f"   tiny, 16 x 128 tokens per step, {a.steps} steps, {a.nproc} process(es), {os.cpu_count()} CPUs")
    print(f"   guards on  ({', '.join(installed)}): {on:,.0f} tok/s (median of {a.reps})")
    print(f"   guards off: {off:,.0f} tok/s (median of {a.reps})")
    print(f"   ratio on/off {on / off:.3f}  ->  overhead {100 * (1 - on / off):+.2f}% (target <= 3%)")


if __name__ == "__main__":
    main()
