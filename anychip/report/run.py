"""Everything a run directory says about its run, read without touching the run: config.toml,
events.jsonl, metrics.jsonl, eval.json, fatal.json and the heartbeats, and experts.jsonl (the largest,
read only when asked for: the report's heatmaps). Works while the run is still writing (a last line cut
short is skipped) and on runs with a single step.

Every file is untrusted input (a copied or shared run may hold anything): only regular files inside the
run are read, each with a cap on its size (anychip.runread, anychip.events); a malformed record or file is
left out and said in ``Run.skipped``, which status and the report show, never raised."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from statistics import median

from ..config import tomllib
from ..events import EVENT, MAX_READ_BYTES, METRIC, keep_fitting, read_jsonl, read_jsonl_tail
from ..goodput import Goodput, goodput_of
from ..launch import FATAL
from ..runread import NotReadable, read_small

# A run with no record for this long (and at least this many median step times) is not running.
STALE_S = 120.0
STALE_STEPS = 20
HEARTBEAT_BYTES = 64 << 10
# What `anychip status` keeps of each metrics record (its figures and goodput's): a small copy of a long run.
STATUS_METRICS = (
    "step", "time", "step_time", "snapshot_s", "snapshot_wait_s", "loss", "eval_loss", "tokens_per_s", "mfu",
    "memory_peak_gb", "reward", "accuracy", "kl",
)  # fmt: skip


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
    skipped: list[str] = field(default_factory=list)  # what was not read, or read in part, and why

    @cached_property
    def experts(self) -> list[dict]:
        """experts.jsonl, read at the first use: {"step", "time", "layers", "tokens": [[per expert] per MoE
        layer]}, each record the tokens of the steps since the record before."""
        records = read_jsonl(self.path / "experts.jsonl")
        kept = [r for r in records if _expert_record(r)]
        records.skipped += len(records) - len(kept)
        self.skipped += records.notes("experts.jsonl")
        return kept

    @property
    def is_grpo(self) -> bool:
        return self.config.get("train", {}).get("mode") == "grpo" or any("reward" in m for m in self.metrics)

    @property
    def total_steps(self) -> int | None:
        steps = self.config.get("train", {}).get("steps")
        return steps if isinstance(steps, int) and not isinstance(steps, bool) else None

    @property
    def last_step(self) -> int:
        return self.metrics[-1]["step"] if self.metrics else 0

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric over the records that count (the last occurrence of each step),
        in step order; records without a finite value for the key are left out."""
        last = {m["step"]: m for m in self.metrics}
        pairs = [(s, m[key]) for s, m in sorted(last.items()) if isinstance(m.get(key), int | float)]
        return [s for s, _ in pairs], [float(v) for _, v in pairs]


def _expert_record(r: dict) -> bool:
    step, tokens = r.get("step"), r.get("tokens")
    return (
        isinstance(step, int)
        and isinstance(tokens, list)
        and all(isinstance(layer, list) and all(_finite(n) for n in layer) for layer in tokens)
    )


def load_run(path: str | Path, now: float | None = None, metric_keys: tuple[str, ...] | None = None) -> Run:
    """Read the run directory (experts.jsonl only later, when ``Run.experts`` is used); FileNotFoundError
    names it when it holds no run (no events.jsonl). ``metric_keys``: keep only these of each metrics
    record (`anychip status`: STATUS_METRICS), all by default (the report)."""
    path = Path(path)
    if not (path / "events.jsonl").is_file():
        what = "does not exist" if not path.exists() else "is not a run directory (no events.jsonl)"
        raise FileNotFoundError(f"{path} {what}")
    skipped: list[str] = []
    config = {}
    for name in ("config.toml", "launch.toml"):
        if (path / name).exists():
            config = _config(path, name, skipped)
            break
    events = keep_fitting(read_jsonl(path / "events.jsonl"), EVENT)
    metrics = read_jsonl_tail(path / "metrics.jsonl", MAX_READ_BYTES, METRIC, keys=metric_keys)
    skipped += events.notes("events.jsonl") + metrics.notes("metrics.jsonl")
    eval_result = _eval(path, skipped) if (path / "eval.json").exists() else None
    start = next((e for e in events if e["event"] == "run_start"), {})
    run = Run(path, config, events, metrics, eval_result, goodput_of(events, metrics), "", start=start)
    run.state, run.state_detail = _state(run, now if now is not None else time.time(), skipped)
    run.skipped = skipped
    return run


def _read_json(path: Path, root: Path, skipped: list[str], cap: int = 1 << 20) -> object:
    """The JSON in a small file of the run; None, said in ``skipped``, when it cannot be read or parsed."""
    try:
        return json.loads(read_small(path, root, cap))
    except FileNotFoundError:
        return None  # removed since it was listed
    except NotReadable as e:
        skipped.append(str(e))
    except OSError as e:
        skipped.append(f"{path.relative_to(root)}: {e.strerror}; not read")
    except (ValueError, RecursionError):  # being written, or not JSON
        skipped.append(f"{path.relative_to(root)}: not JSON; not read")
    return None


def _config(path: Path, name: str, skipped: list[str]) -> dict:
    """config.toml (or launch.toml): its tables; {} when it is not TOML, a table that is not one left out."""
    try:
        raw = tomllib.loads(read_small(path / name, path).decode())
    except NotReadable as e:
        skipped.append(str(e))
        return {}
    except OSError as e:
        skipped.append(f"{name}: {e.strerror}; not read")
        return {}
    except (ValueError, RecursionError) as e:  # TOMLDecodeError, UnicodeDecodeError
        skipped.append(f"{name}: not TOML ({e}); not read")
        return {}
    tables = {k: v for k, v in raw.items() if isinstance(v, dict)}
    if len(tables) < len(raw):
        skipped.append(f"{name}: {', '.join(k for k in raw if k not in tables)} not a table; left out")
    return tables


def _eval(path: Path, skipped: list[str]) -> dict | None:
    """eval.json: held-out accuracy; None when it is not one (its numbers not numbers)."""
    e = _read_json(path / "eval.json", path, skipped)
    if e is None:
        return None
    numbers = ("accuracy", "correct", "exact_accuracy")
    if not isinstance(e, dict) or not all(_finite(e.get(k, 0)) for k in numbers) or "accuracy" not in e:
        skipped.append("eval.json: not a held-out result (accuracy, correct, exact_accuracy: numbers); not shown")
        return None
    return e


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _state(run: Run, now: float, skipped: list[str]) -> tuple[str, str]:
    fatal = run.path / FATAL
    if fatal.exists():
        record = _read_json(fatal, run.path, skipped)
        error = record.get("error", "") if isinstance(record, dict) else ""
        return "stopped", error if isinstance(error, str) else str(error)
    starts = [i for i, e in enumerate(run.events) if e["event"] == "run_start"]
    end = next((e for e in reversed(run.events[starts[-1] if starts else 0 :]) if e["event"] == "run_end"), None)
    if end is not None:
        if end.get("status") == "ok":
            return "finished", ""
        return "failed", end.get("error") or ""
    latest = max([r["time"] for r in run.events + run.metrics] + _heartbeats(run.path, skipped), default=0.0)
    step_time = median(m["step_time"] for m in run.metrics) if run.metrics else 0.0
    quiet = now - latest
    if quiet <= max(STALE_S, STALE_STEPS * step_time):
        return "running", ""
    return "interrupted", f"no record for {quiet / 60:.0f} min and no run_end event"


def _heartbeats(path: Path, skipped: list[str]) -> list[float]:
    """The time of each rank's last beat. A beat being rewritten is passed over; a file that is not a beat
    (a FIFO, a link out of the run, not JSON...) is said in ``skipped``."""
    out, beats = [], path / "heartbeat"
    if not beats.is_dir():
        return out
    if beats.is_symlink():
        skipped.append("heartbeat: a link, not the run's directory; not read")
        return out
    for beat in sorted(beats.glob("*.json")):
        try:
            record = json.loads(read_small(beat, path, HEARTBEAT_BYTES))
            out.append(float(record["time"]))
        except FileNotFoundError:
            continue  # being rewritten (renamed over)
        except NotReadable as e:
            skipped.append(str(e))
        except (OSError, ValueError, RecursionError, KeyError, TypeError, OverflowError):
            skipped.append(f"heartbeat/{beat.name}: not a heartbeat; not read")
    return [t for t in out if math.isfinite(t)]
