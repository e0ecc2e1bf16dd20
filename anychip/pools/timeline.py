"""A run of pools in time: which pool computed which steps, each loss of a pool, the time
without one, and the goodput of every pool and of the fleet (`anychip goodput`, `anychip report`).

    losses       a pool's job ended in failure (the launcher's pool_exited, code != 0): the
                 time to the next step of a pool still alive, and to the lost pool's return
                 (its pool_recovered: it holds a live pool's state again)
    without      for each loss, from the death to the return (or to the run's last record)
    goodput      each pool's `anychip goodput`; the fleet's: productive time of all pools over
                 the wall time of all pools (a pool's time while it is down counts as wall)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..events import read_jsonl
from ..goodput import Goodput, goodput


def pool_dirs(run_dir: Path) -> list[Path]:
    """The pools of a run directory of `anychip train --pools K` (none for an ordinary run)."""
    run_dir = Path(run_dir)
    if not (run_dir / "pools.toml").is_file():
        return []
    return sorted(
        (p for p in run_dir.glob("pool*") if p.is_dir() and p.name[4:].isdigit()), key=lambda p: int(p.name[4:])
    )


@dataclass
class Timeline:
    pools: list[str]
    steps: dict[str, list[tuple[int, int, float, float]]]  # pool -> runs of steps: (first, last, t0, t1)
    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # pool -> (step, time) of each record
    losses: list[dict] = field(default_factory=list)
    goodputs: dict[str, Goodput] = field(default_factory=dict)
    start: float = 0.0
    end: float = 0.0

    @property
    def without_s(self) -> float:
        return sum(loss["without_s"] for loss in self.losses)

    @property
    def fleet_goodput(self) -> float:
        wall = sum(g.wall_s for g in self.goodputs.values())
        return sum(g.productive_s for g in self.goodputs.values()) / wall if wall else 0.0

    def as_dict(self) -> dict:
        return {
            "pools": self.pools,
            "steps": self.steps,
            "losses": self.losses,
            "without_s": self.without_s,
            "fleet_goodput": self.fleet_goodput,
            "goodput": {p: g.ratio for p, g in self.goodputs.items()},
            "wall_s": self.end - self.start,
        }


def timeline(run_dir: str | Path) -> Timeline:
    """The timeline of a pools run directory; raises FileNotFoundError for another directory."""
    run_dir = Path(run_dir)
    dirs = pool_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"{run_dir}: not the run directory of `anychip train --pools K` (no pools.toml)")
    launcher = read_jsonl(run_dir / "events.jsonl")
    names = [d.name for d in dirs]
    metrics = {d.name: read_jsonl(d / "metrics.jsonl") for d in dirs}
    events = {d.name: read_jsonl(d / "events.jsonl") for d in dirs}
    t = Timeline(names, {name: _runs(metrics[name]) for name in names})
    t.points = {name: [(m["step"], m["time"]) for m in metrics[name]] for name in names}
    times = [e["time"] for e in launcher] + [m["time"] for ms in metrics.values() for m in ms]
    t.start, t.end = (min(times), max(times)) if times else (0.0, 0.0)
    for e in launcher:
        if e["event"] != "pool_exited" or e["code"] == 0:
            continue
        pool, died = e["pool"], e["time"]
        others = [m["time"] for name in names if name != pool for m in metrics[name] if m["time"] > died]
        back = [r["time"] for r in events.get(pool, []) if r["event"] == "pool_recovered" and r["time"] > died]
        first_back = [m["time"] for m in metrics.get(pool, []) if m["time"] > died]
        t.losses.append(
            {
                "pool": pool,
                "time": died,
                "code": e["code"],
                "next_step_s": min(others) - died if others else None,  # the run went on
                "rejoin_s": min(back) - died if back else None,  # holds a live pool's state again
                "first_step_s": min(first_back) - died if first_back else None,
                "without_s": (min(back) if back else t.end) - died,
            }
        )
    for d in dirs:
        if (d / "events.jsonl").is_file():
            t.goodputs[d.name] = goodput(d)
    return t


def _runs(metrics: list[dict]) -> list[tuple[int, int, float, float]]:
    """Consecutive steps of one pool, with the wall time of their first and last records."""
    out: list[list] = []
    for m in metrics:
        if out and m["step"] == out[-1][1] + 1:
            out[-1][1], out[-1][3] = m["step"], m["time"]
        else:
            out.append([m["step"], m["step"], m["time"] - m.get("step_time", 0.0), m["time"]])
    return [tuple(r) for r in out]


def format_timeline(t: Timeline) -> str:
    lines = [f"{len(t.pools)} pools, wall time {t.end - t.start:.1f} s, fleet goodput {100 * t.fleet_goodput:.1f}%"]
    for pool in t.pools:
        runs = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b, _, _ in t.steps[pool]) or "none"
        g = t.goodputs.get(pool)
        share = f"goodput {100 * g.ratio:.1f}%" if g is not None else ""
        lines.append(f"  {pool}: steps {runs}  {share}")
    for loss in t.losses:
        fmt = lambda v: f"{v:.1f} s" if v is not None else "never"  # noqa: E731
        lines.append(
            f"  {loss['pool']} lost (exit {loss['code']}): next step of the others after {fmt(loss['next_step_s'])}, "
            f"back after {fmt(loss['rejoin_s'])}, {loss['without_s']:.1f} s without it"
        )
    return "\n".join(lines)
