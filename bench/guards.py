"""Cost of the guards, on this machine, in one run: `anychip train` (tiny, the demo's
batch) with every guard on at its default intervals against every guard off, runs
alternating (on, off, on, off, ...). Compared: training tokens per second of the whole
loop (steps, guard checks, checkpoints; `train_time_s` of the run_end event).

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
from pathlib import Path

OFF = ["guards.nonfinite=false", "guards.spike=false", "guards.watchdog=false", "guards.audit_interval=0",
       "guards.replica_check_interval=0", "guards.straggler_interval=0"]  # fmt: skip


def run(run_dir: Path, steps: int, nproc: int, guards: bool) -> dict:
    sets = [f"train.steps={steps}", "eval.n=0", "log.tensorboard=false", "log.progress=false",
            "train.log_interval=100000", "device.type=cpu", "parallel.max_restarts=0", f"parallel.nproc={nproc}",
            "parallel.strategy=ddp", *([] if guards else OFF)]  # fmt: skip
    cmd = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "run_end")
    tokens = steps * 16 * 128
    installed = next(e for e in events if e["event"] == "guards")["installed"]
    return {"tokens_per_s": tokens / end["train_time_s"], "installed": installed}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--nproc", type=int, default=1)
    a = p.parse_args()
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
    print(f"tiny, 16 x 128 tokens per step, {a.steps} steps, {a.nproc} process(es), {os.cpu_count()} CPUs")
    print(f"guards on  ({', '.join(installed)}): {on:,.0f} tok/s (median of {a.reps})")
    print(f"guards off: {off:,.0f} tok/s (median of {a.reps})")
    print(f"ratio on/off {on / off:.3f}  ->  overhead {100 * (1 - on / off):+.2f}% (target <= 3%)")


if __name__ == "__main__":
    main()
