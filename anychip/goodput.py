"""`anychip goodput`: where a run's wall time went, from its events and metrics.

    productive   step time of every step that counts toward the result
    recomputed   step time of steps done again after a crash (work lost)
    ckpt stall   time the loop stood still for a checkpoint (the save call, and any wait
                 for background staging before the next optimizer step)
    restart      everything else between the first start and the last record:
                 process starts, resume, rendezvous, evaluation, time to detect a fault

The four parts add up to the wall time by construction; goodput = productive / wall.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .train.runlog import read_jsonl


@dataclass
class Goodput:
    wall_s: float
    productive_s: float
    recomputed_s: float
    checkpoint_stall_s: float
    restart_s: float
    steps: int
    recomputed_steps: int
    restarts: int

    @property
    def ratio(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0


def goodput(run_dir: str | Path) -> Goodput:
    """Split the wall time of ``run_dir``; raises FileNotFoundError without events.jsonl."""
    run_dir = Path(run_dir)
    if not (run_dir / "events.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir / 'events.jsonl'}: not a run directory")
    events = read_jsonl(run_dir / "events.jsonl")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    starts = [e["time"] for e in events if e["event"] == "run_start"]
    times = [e["time"] for e in events] + [m["time"] for m in metrics]
    wall = max(times) - min(starts) if starts else 0.0
    last_index = {m["step"]: i for i, m in enumerate(metrics)}  # the occurrence that counts
    productive = sum(m["step_time"] for i, m in enumerate(metrics) if last_index[m["step"]] == i)
    recomputed = sum(m["step_time"] for i, m in enumerate(metrics) if last_index[m["step"]] != i)
    stall = sum(e.get("stall_s", 0.0) for e in events if e["event"] == "checkpoint_save")
    # waits for background staging happen inside a step: move them from productive to stall
    staged = sum(e.get("stall_s", 0.0) for e in events if e["event"] == "checkpoint_staged")
    productive = max(productive - staged, 0.0)
    stall += staged
    restart = max(wall - productive - recomputed - stall, 0.0)
    return Goodput(
        wall, productive, recomputed, stall, restart, steps=len(last_index),
        recomputed_steps=len(metrics) - len(last_index), restarts=max(len(starts) - 1, 0),
    )  # fmt: skip


def format_goodput(g: Goodput) -> str:
    rows = [("productive steps", g.productive_s), ("recomputed (lost) steps", g.recomputed_s),
            ("checkpoint stalls", g.checkpoint_stall_s), ("restarts, start-up, eval", g.restart_s)]  # fmt: skip
    lines = [f"wall time {g.wall_s:.1f} s, {g.steps} steps, {g.recomputed_steps} recomputed, {g.restarts} restarts"]
    for name, t in rows:
        share = 100 * t / g.wall_s if g.wall_s else 0.0
        lines.append(f"  {name:<26}{t:>9.1f} s  {share:5.1f}%")
    lines.append(f"goodput {100 * g.ratio:.1f}%")
    return "\n".join(lines)
