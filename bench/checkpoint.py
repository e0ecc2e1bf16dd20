"""Checkpoint cost and recovery time, on this machine, in one run.

1. Stall per save: how long `anychip train` itself stands still for one checkpoint of the
   `tiny` model with its AdamW state, with the asynchronous save (stage to host memory and
   write in the background) against `checkpoint.async_save = false` (a synchronous DCP
   save and commit of the same state). Runs alternate (ABAB), medians over all saves.
2. Recovery: `anychip train` (tiny, elastic agent with max_restarts=1) is SIGKILLed after
   a committed checkpoint; the time from the kill to the first completed resumed step,
   split into detection + process start, resume (checkpoint load) and the first step.

    python bench/checkpoint.py [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def stall_bench(reps: int, tmp: Path) -> dict:
    """Loop stall per save inside `anychip train` itself (tiny, the demo's batch): runs with
    async and with synchronous saves alternate (ABAB); the stall of a save is the save call
    plus any wait for staging before the next optimizer step (both are events)."""
    from anychip.config import load_config
    from anychip.train.loop import train

    base = [
        "train.steps=24",
        "checkpoint.interval=4",
        "checkpoint.keep=1",
        "eval.n=0",
        "log.tensorboard=false",
        "log.progress=false",
        "train.log_interval=1000",
        "device.type=cpu",
    ]
    stalls: dict[str, list[float]] = {"async": [], "sync": []}
    calls, waits = [], []
    train_s: dict[str, list[float]] = {"async": [], "sync": []}  # whole loop: what a save costs later steps too
    size = 0
    for i in range(reps):
        for mode in ("async", "sync"):
            run = tmp / f"{mode}{i}"
            train(load_config(None, [*base, f"checkpoint.async_save={'true' if mode == 'async' else 'false'}"]), run)
            events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
            saves = [e for e in events if e["event"] == "checkpoint_save"]
            staged = [e["stall_s"] for e in events if e["event"] == "checkpoint_staged"]
            per_save = [e["stall_s"] for e in saves]
            for k, wait in enumerate(staged[: len(per_save)]):
                per_save[k] += wait
            stalls[mode] += per_save
            train_s[mode].append(next(e["train_time_s"] for e in events if e["event"] == "run_end"))
            if mode == "async":
                calls += [e["stall_s"] for e in saves]
                waits += staged
            size = max(e.get("bytes", 0) for e in events if e["event"] == "checkpoint_commit")
            shutil.rmtree(run)
    a, s = statistics.median(stalls["async"]), statistics.median(stalls["sync"])
    return {
        "state_mb": size / 2**20,
        "saves": len(stalls["async"]),
        "async_stall_s": a,
        "sync_stall_s": s,
        "ratio": a / s,
        "async_call_s": statistics.median(calls),
        "async_wait_s": statistics.median(waits) if waits else 0.0,  # none on CPU: staged in the save call
        "train_s": {m: statistics.median(t) for m, t in train_s.items()},
    }


def recovery_bench(tmp: Path) -> dict:
    run = tmp / "run"
    sets = [
        "train.steps=60",
        "checkpoint.interval=5",
        "parallel.max_restarts=1",
        "eval.n=0",
        "log.tensorboard=false",
        "train.log_interval=1000",
    ]
    args = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run)]
    for s in sets:
        args += ["--set", s]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def events():
        path = run / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    deadline = time.time() + 300
    while not any(e["event"] == "checkpoint_commit" and e["step"] >= 10 for e in events()):
        if time.time() > deadline or p.poll() is not None:
            raise RuntimeError("the run did not reach a committed checkpoint")
        time.sleep(0.01)
    pid = [e for e in events() if e["event"] == "run_start"][-1]["pid"]
    killed = time.time()
    os.kill(pid, signal.SIGKILL)
    p.wait(timeout=600)
    ev = events()
    restart = next(e for e in ev if e["event"] == "run_start" and e.get("restart") == 1)
    load = next(e for e in ev if e["event"] == "checkpoint_load" and e["time"] > killed)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if m["time"] > killed)
    return {
        "kill_to_first_step_s": first["time"] - killed,
        "detect_and_start_s": restart["time"] - killed,
        "resume_s": load["time"] - restart["time"],
        "first_step_s": first["time"] - load["time"],
        "resumed_from_step": load["step"],
        "exit_code": p.returncode,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2, help="runs per mode (6 saves each)")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="anychip-ckpt-bench-"))
    try:
        s = stall_bench(a.reps, tmp)
        print(
            f"loop stall per checkpoint in `anychip train` (tiny, 16 x 128, checkpoint {s['state_mb']:.0f} MiB), "
            f"median of {s['saves']} saves per mode, torch {torch.__version__}"
        )
        print(
            f"  async (default):  {1000 * s['async_stall_s']:8.1f} ms  (save call {1000 * s['async_call_s']:.1f} ms"
            f" + wait for staging before the next optimizer step {1000 * s['async_wait_s']:.1f} ms)"
        )
        print(f"  synchronous DCP:  {1000 * s['sync_stall_s']:8.1f} ms  (write + manifest + commit)")
        print(f"  ratio async / sync stall: {100 * s['ratio']:.1f}%  (target <= 10%)")
        t = s["train_s"]
        print(f"  whole training loop (24 steps, 6 saves): async {t['async']:.2f} s, sync {t['sync']:.2f} s")
        r = recovery_bench(tmp)
        print(f"recovery from SIGKILL to the first resumed step (tiny, 1 process): {r['kill_to_first_step_s']:.1f} s")
        print(
            f"  detection + process start {r['detect_and_start_s']:.1f} s, resume {r['resume_s']:.1f} s, "
            f"first step {r['first_step_s']:.1f} s (resumed from step {r['resumed_from_step']}, exit {r['exit_code']})"
        )
        if a.json:
            a.json.write_text(json.dumps({"stall": s, "recovery": r}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
