"""What snapshots cost a run without faults, side by side, on this machine, in one run.

`anychip train` on `tiny` with the chaos soak's layout (2 processes, DDP, no disk
checkpoints so that only the snapshots differ), three ways, alternating (ABCABC):
snapshots off (`checkpoint.snapshot_interval = 0`), every step copied in a background
thread (the default), and every step copied in the loop (`checkpoint.snapshot_async =
false`). Reported: the training loop's time (run_end train_time_s, start-up excluded) and
the median step, each as a ratio to the run without snapshots, and the median stall of the
loop per snapshot (the call plus any wait for the background copy).

    python bench/snapshot.py [--steps 60] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "off": ["checkpoint.snapshot_interval=0"],
    "every step, background": ["checkpoint.snapshot_interval=1"],
    "every step, in the loop": ["checkpoint.snapshot_interval=1", "checkpoint.snapshot_async=false"],
    "every 4 steps, background": ["checkpoint.snapshot_interval=4"],
}


def run(run_dir: Path, steps: int, sets: list[str]) -> dict:
    base = [
        "model.preset=tiny",
        f"train.steps={steps}",
        "eval.n=0",
        "log.tensorboard=false",
        "log.progress=false",
        "device.type=cpu",
        "parallel.nproc=2",
        "parallel.strategy=ddp",
        "checkpoint.interval=0",
    ]
    cmd = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run_dir)]
    for s in (*base, *sets):
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{run_dir.name} failed:\n{r.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "run_end")
    stalls = [m.get("snapshot_s", 0.0) + m.get("snapshot_wait_s", 0.0) for m in metrics[1:]]
    return {
        "train_s": end["train_time_s"],
        "step_s": statistics.median(m["step_time"] for m in metrics[2:]),
        "stall_s": statistics.median(stalls) if stalls else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.reps):
            for i, (name, sets) in enumerate(VARIANTS.items()):
                results[name].append(run(Path(tmp) / f"{rep}-{i}", a.steps, sets))
    off = results["off"]
    base_train = statistics.median(r["train_s"] for r in off)
    base_step = statistics.median(r["step_s"] for r in off)
    print(f"tiny, {a.steps} steps, 2 processes (DDP), {a.reps} runs each, alternating; ratios to 'off'")
    print(f"{'snapshots':<26}{'loop s (runs)':>24}{'x off':>8}{'step ms':>10}{'x off':>8}{'stall ms':>10}")
    for name, rs in results.items():
        train_s = statistics.median(r["train_s"] for r in rs)
        step_s = statistics.median(r["step_s"] for r in rs)
        runs = ", ".join(f"{r['train_s']:.1f}" for r in rs)
        stall = statistics.median(r["stall_s"] for r in rs) * 1e3
        print(
            f"{name:<26}{f'{train_s:.1f} ({runs})':>24}{train_s / base_train:>8.3f}"
            f"{step_s * 1e3:>10.1f}{step_s / base_step:>8.3f}{stall:>10.1f}"
        )


if __name__ == "__main__":
    main()
