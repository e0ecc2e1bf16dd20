"""Chaos soak: `tiny` for a few hundred steps with a random fault about every 25 steps
(kill, exception, hang, NaN, bit flip, slow rank, corrupted checkpoint, failing
checkpoint write), 2 processes with DDP; then the same run without faults. The soak
must end with the same final weights; its goodput and faults are printed.

    python bench/chaos_soak.py [--steps 300] [--every 25] [--seed 13] [--preset tiny] [--replica-check 1]

--replica-check: how often the replicas' weights are compared (guards.replica_check_interval):
a bit flip is found up to that many steps late, and the steps since the last agreement are
redone. A check costs a sum over the local parameters and an all-gather of one integer
(5.8 ms for `tiny` on one core here).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train(run_dir: Path, sets: list[str], *args: str) -> float:
    """`anychip train` to the end (exits with its output when it fails); returns its wall time."""
    cmd = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run_dir), *args]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{run_dir.name} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


def steps_redone(run_dir: Path) -> list[int]:
    """Per recovery (a restart's or a rollback's load of a snapshot or checkpoint): how many
    steps already done will be done again: the step of the last record before it, less the
    step it restored."""
    from anychip.events import read_jsonl

    events, metrics = read_jsonl(run_dir / "events.jsonl"), read_jsonl(run_dir / "metrics.jsonl")
    out = []
    for e in events:
        if e["event"] in ("snapshot_load", "checkpoint_load"):
            done = [m["step"] for m in metrics if m["time"] < e["time"]]
            if done:
                out.append(max(done[-1] - e["step"], 0))
    return out


def main() -> None:
    from anychip.goodput import format_goodput, goodput

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--replica-check", type=int, default=1, help="guards.replica_check_interval")
    a = p.parse_args()
    sets = [
        f"model.preset={a.preset}",
        f"train.steps={a.steps}",
        "eval.n=0",
        "log.tensorboard=false",
        "log.progress=false",
        "device.type=cpu",
        "parallel.nproc=2",
        "parallel.strategy=ddp",
        "parallel.max_restarts=30",
        "checkpoint.interval=25",
        "checkpoint.keep=3",
        f"guards.replica_check_interval={a.replica_check}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        soak, clean = Path(tmp) / "soak", Path(tmp) / "clean"
        t_soak = train(soak, [*sets, f"chaos.every={a.every}", f"chaos.seed={a.seed}"])
        t_clean = train(clean, sets)
        x, y = load_file(soak / "final" / "model.safetensors"), load_file(clean / "final" / "model.safetensors")
        same = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        print(
            f"{a.preset}, {a.steps} steps, 2 processes (DDP), a random fault about every {a.every} steps "
            f"(seed {a.seed}); replicas compared every {a.replica_check} steps"
        )
        print(f"wall time: soak {t_soak:.0f} s, clean {t_clean:.0f} s")
        print(format_goodput(goodput(soak)))
        from anychip.events import read_jsonl

        agent = [e for e in read_jsonl(soak / "events.jsonl") if e["event"] == "worker_restart"]
        alone = [e for e in agent if e["scope"] == "rank"]
        print(
            f"processes started again by the agent: {len(agent)}, {len(alone)} of them alone "
            f"({sum(bool(e['spare']) for e in alone)} on a warm spare), {len(agent) - len(alone)} with every worker"
        )
        redone = steps_redone(soak)
        print(
            f"steps redone per recovery (the newest step done before it, less the step it resumed from): {redone}, "
            f"median {statistics.median(redone) if redone else 0:g}"
        )
        print(f"final weights bit-identical to the clean run: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
