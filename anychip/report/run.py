"""Everything a run directory says about its run, read without touching the run: config.toml,
events.jsonl, metrics.jsonl, eval.json, fatal.json and the heartbeats, and experts.jsonl (the largest,
read only when asked for: the report's heatmaps). Works while the run is still writing (a last line cut
short is skipped) and on runs with a single step."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from statistics import median

from ..config import tomllib
from ..events import read_jsonl
from ..goodput import Goodput, goodput_of
from ..launch import FATAL

# A run with no record for this long (and at least this many median step times) is not running.
STALE_S = 120.0
STALE_STEPS = 20


@dataclass
class Run:
    path: Path
    config: dict  # the resolved config.toml (launch.toml while a launch has not written it yet)
    events: list[dict]
    metrics: list[dict]  # every step record, a recomputed step again after a restart
    eval: dict | None  # eval.json: held-out accuracy after training
    goodput: Goodput
    state: str  # running | finished | failed | stopped | interrupted
    state_detail: str = ""
    start: dict = field(default_factory=dict)  # the first run_start event (device, world size, ...)

    @cached_property
    def experts(self) -> list[dict]:
        """experts.jsonl, read at the first use: {"step", "time", "layers", "tokens": [[per expert] per MoE
        layer]}, each record the tokens of the steps since the record before."""
        return read_jsonl(self.path / "experts.jsonl")

    @property
    def is_grpo(self) -> bool:
        return self.config.get("train", {}).get("mode") == "grpo" or any("reward" in m for m in self.metrics)

    @property
    def total_steps(self) -> int | None:
        return self.config.get("train", {}).get("steps")

    @property
    def last_step(self) -> int:
        return self.metrics[-1]["step"] if self.metrics else 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric over the records that count (the last occurrence of each step),
        in step order; records without a finite value for the key are left out."""
        last = {m["step"]: m for m in self.metrics}
        pairs = [(s, m[key]) for s, m in sorted(last.items()) if isinstance(m.get(key), int | float)]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]


def load_run(path: str | Path, now: float | None = None) -> Run:
    """Read the run directory (experts.jsonl only later, when ``Run.experts`` is used); FileNotFoundError
    names it when it holds no run (no events.jsonl)."""
    path = Path(path)
    if not (path / "events.jsonl").is_file():
        what = "does not exist" if not path.exists() else "is not a run directory (no events.jsonl)"
        raise FileNotFoundError(f"{path} {what}")
    config = {}
    for name in ("config.toml", "launch.toml"):
        if (path / name).is_file():
            config = tomllib.loads((path / name).read_text())
            break
    events, metrics = read_jsonl(path / "events.jsonl"), read_jsonl(path / "metrics.jsonl")
    eval_result = None
    if (path / "eval.json").is_file():
        try:
            eval_result = json.loads((path / "eval.json").read_text())
        except json.JSONDecodeError:
            eval_result = None  # being written
    start = next((e for e in events if e["event"] == "run_start"), {})
    run = Run(path, config, events, metrics, eval_result, goodput_of(events, metrics), "", start=start)
    run.state, run.state_detail = _state(run, now if now is not None else time.time())
    return run


def _state(run: Run, now: float) -> tuple[str, str]:
    fatal = run.path / FATAL
    if fatal.is_file():
        try:
            return "stopped", json.loads(fatal.read_text()).get("error", "")
        except json.JSONDecodeError:
            return "stopped", ""
    starts = [i for i, e in enumerate(run.events) if e["event"] == "run_start"]
    end = next((e for e in reversed(run.events[starts[-1] if starts else 0 :]) if e["event"] == "run_end"), None)
    if end is not None:
        if end.get("status") == "ok":
            return "finished", ""
        return "failed", end.get("error", "")
    latest = max([r["time"] for r in run.events + run.metrics] + _heartbeats(run.path), default=0.0)
    step_time = median(m["step_time"] for m in run.metrics) if run.metrics else 0.0
    quiet = now - latest
    if quiet <= max(STALE_S, STALE_STEPS * step_time):
        return "running", ""
    return "interrupted", f"no record for {quiet / 60:.0f} min and no run_end event"


def _heartbeats(path: Path) -> list[float]:
    out = []
    for beat in (path / "heartbeat").glob("*.json") if (path / "heartbeat").is_dir() else ():
        try:
            out.append(float(json.loads(beat.read_text())["time"]))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            continue  # being rewritten
    return out
