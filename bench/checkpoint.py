"""Checkpoint cost and recovery time, on this machine, in one run.

1. Stall per save: how long the training loop stands still for one checkpoint of the
   `tiny` model with its AdamW state, with anychip's asynchronous DCP save (stage to host
   memory, write in the background) against a synchronous DCP save of the same state.
   The two alternate (ABAB), medians reported, ratio async / sync.
2. Recovery: `anychip train` (tiny, elastic agent with max_restarts=1) is SIGKILLed after
   a committed checkpoint; the time from the kill to the first completed resumed step,
   split into detection + process start, resume (checkpoint load) and the first step.

    python bench/checkpoint.py [--reps 5]
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
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anychip.models import DeepSeekV3, preset  # noqa: E402


def stall_bench(reps: int, tmp: Path) -> dict:
    model = DeepSeekV3(preset("tiny").replace(vocab_size=512))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (4, 64))
    model.loss(x, torch.roll(x, -1, 1)).loss.backward()
    opt.step()  # AdamW state exists
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    async_stalls, sync_stalls, async_total = [], [], []
    stager = DefaultStager(StagingOptions(False, False, True, False))  # as anychip's Checkpointer on CPU
    for i in range(reps):
        t0 = time.perf_counter()
        m, o = get_state_dict(model, opt)
        response = dcp.async_save(
            {"model": m, "optim": o}, checkpoint_id=str(tmp / f"a{i}"), no_dist=True, async_stager=stager
        )
        call = time.perf_counter() - t0
        # the loop runs the next forward/backward here (timed as the same work for both: none),
        # then waits for staging before the optimizer changes the weights
        model.loss(x, torch.roll(x, -1, 1)).loss.backward()
        t1 = time.perf_counter()
        response.staging_completion.result()
        async_stalls.append(call + time.perf_counter() - t1)
        response.upload_completion.result()
        async_total.append(time.perf_counter() - t0)
        model.loss(x, torch.roll(x, -1, 1)).loss.backward()  # the same compute on the sync side
        t0 = time.perf_counter()
        m, o = get_state_dict(model, opt)
        dcp.save({"model": m, "optim": o}, checkpoint_id=str(tmp / f"s{i}"), no_dist=True)
        sync_stalls.append(time.perf_counter() - t0)
    a, s = statistics.median(async_stalls), statistics.median(sync_stalls)
    return {"state_mb": nbytes / 2**20, "async_stall_s": a, "async_total_s": statistics.median(async_total),
            "sync_stall_s": s, "ratio": a / s}  # fmt: skip


def recovery_bench(tmp: Path) -> dict:
    run = tmp / "run"
    sets = ["train.steps=60", "checkpoint.interval=5", "parallel.max_restarts=1", "eval.n=0",
            "log.tensorboard=false", "train.log_interval=1000"]  # fmt: skip
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
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="anychip-ckpt-bench-"))
    try:
        s = stall_bench(a.reps, tmp)
        print(
            f"checkpoint stall, tiny + AdamW state ({s['state_mb']:.0f} MiB), median of {a.reps}, torch {torch.__version__}"
        )
        print(
            f"  async (anychip):  {1000 * s['async_stall_s']:8.1f} ms stall  (save call + wait for staging after one overlapped forward/backward)"
        )
        print(f"  sync DCP save:    {1000 * s['sync_stall_s']:8.1f} ms stall")
        print(f"  ratio async / sync stall: {100 * s['ratio']:.1f}%  (target <= 10%)")
        r = recovery_bench(tmp)
        print(f"recovery from SIGKILL to the first resumed step (tiny, 1 process): {r['kill_to_first_step_s']:.1f} s")
        print(f"  detection + process start {r['detect_and_start_s']:.1f} s, resume {r['resume_s']:.1f} s, "
              f"first step {r['first_step_s']:.1f} s (resumed from step {r['resumed_from_step']}, exit {r['exit_code']})")  # fmt: skip
        if a.json:
            a.json.write_text(json.dumps({"stall": s, "recovery": r}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
