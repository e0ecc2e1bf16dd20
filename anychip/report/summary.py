"""The figures of a run that fit in one table: what ran where, how far it got, how fast, how much time
faults cost. Shared by `anychip status` and the head of `anychip report`."""

from __future__ import annotations

import datetime
from statistics import median

from .run import Run


def overview(run: Run) -> list[tuple[str, str]]:
    """(label, value) rows, in reading order; values already formatted."""
    cfg, start, g = run.config, run.start, run.goodput
    model, train, par = cfg.get("model", {}), cfg.get("train", {}), cfg.get("parallel", {})
    state = run.state + (f": {run.state_detail}" if run.state_detail else "")
    total = run.total_steps
    progress = f"step {run.last_step}" + (f" of {total} ({run.last_step / total:.0%})" if total else "")
    recipe = f"{train.get('mode', '?')}" + (f", init from {model['init_from']}" if model.get("init_from") else "")
    batch = (
        f"{train.get('global_batch', '?')} sequences x {train.get('seq_len', '?')} tokens, "
        f"lr {train.get('lr', '?')}, dtype {train.get('dtype', '?')}"
    )
    world_size = start.get("world_size", par.get("nproc", "?"))
    strategy = start.get("strategy", par.get("strategy", "?"))
    time_split = (
        f"{g.ratio:.1%} (productive {_duration(g.productive_s)}, recomputed {_duration(g.recomputed_s)}, "
        f"checkpoint stalls {_duration(g.checkpoint_stall_s)}, snapshot stalls {_duration(g.snapshot_stall_s)}, "
        f"restarts in process {_duration(g.inprocess_restart_s)}, other restarts, start-up and evaluation "
        f"{_duration(g.restart_s)})"
    )
    rows = [
        ("run", str(run.path)),
        ("state", state),
        ("progress", progress),
        ("started", _when(start.get("time"))),
        ("recipe", recipe),
        ("model", _model(model, start)),
        ("batch", batch),
        ("device", f"{start.get('device_name', '?')} ({start.get('device', '?')})"),
        ("world size", f"{world_size}, {strategy}"),
        ("software", f"torch {start.get('torch', '?')}, python {start.get('python', '?')}"),
        ("wall time", _duration(g.wall_s)),
        ("goodput", time_split),
        ("restarts", f"{g.restarts} ({g.inprocess_restarts} in process)"),
        ("faults", ", ".join(f"{k} {v['count']}" for k, v in g.fault_summary.items()) or "none"),
        ("rollbacks", str(sum(e["event"] == "rollback" for e in run.events))),
        ("checkpoints", _checkpoints(run)),
    ]
    rows += _figures(run)
    if run.eval:
        e = run.eval
        accuracy = (
            f"{e['accuracy']:.1%} ({e.get('correct', 0):g}/{e.get('n', '?')}; "
            f"exactly right {e.get('exact_accuracy', 0):.1%})"
        )
        rows.append(("held-out accuracy", accuracy))
    if run.skipped:  # what the run's files held that could not be read: the figures above leave it out
        shown = run.skipped[:5] + ([f"and {len(run.skipped) - 5} more"] if len(run.skipped) > 5 else [])
        rows.append(("skipped", "; ".join(shown)))
    return rows


def fault_rows(run: Run) -> list[list[str]]:
    """Per fault kind: count, injected, detected, median detection latency, time lost."""
    out = []
    for kind, s in run.goodput.fault_summary.items():
        latency = "-" if s["median_latency_s"] is None else f"{s['median_latency_s']:.2f} s"
        lost = "-" if s["lost_s"] is None else _duration(s["lost_s"])
        out.append([kind, str(s["count"]), str(s["injected"]), str(s["detected"]), latency, lost])
    return out


def _figures(run: Run) -> list[tuple[str, str]]:
    rows = []
    steps, loss = run.series("loss")
    if loss:
        rows.append(("loss", f"{loss[0]:.4g} at step {steps[0]} -> {loss[-1]:.4g} at step {steps[-1]}"))
    steps, held = run.series("eval_loss")
    if held:
        times = "once" if len(held) == 1 else f"{len(held)} times"
        rows.append(("held-out loss", f"{held[-1]:.4g} at step {steps[-1]} (measured {times})"))
    if run.is_grpo:
        for key in ("reward", "accuracy", "kl"):
            s, v = run.series(key)
            if v:
                rows.append((key, f"{v[0]:.4g} -> {v[-1]:.4g} (last 10 steps: {_mean(v[-10:]):.4g})"))
    speed = [
        ("tokens_per_s", "tokens/s", "{:,.0f}"),
        ("mfu", "MFU", "{:.1%}"),
        ("step_time", "step time", "{:.3f} s"),
        ("memory_peak_gb", "peak memory", "{:.2f} GiB"),
    ]
    for key, label, fmt in speed:
        _, v = run.series(key)
        if v:
            value = max(v) if key == "memory_peak_gb" else median(v)
            rows.append((label, ("" if key == "memory_peak_gb" else "median ") + fmt.format(value)))
    return rows


def _model(model: dict, start: dict) -> str:
    size = ""
    if start.get("parameters"):
        size = f", {start['parameters']:,} parameters ({start.get('activated', 0):,} active)"
    return f"{model.get('preset', '?')}{size}"


def _checkpoints(run: Run) -> str:
    commits = [e for e in run.events if e["event"] == "checkpoint_commit"]
    if not commits:
        return "none"
    return f"{len(commits)} committed, newest at step {commits[-1]['step']}"


def _when(t: float | None) -> str:
    try:
        return datetime.datetime.fromtimestamp(t).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    except (TypeError, ValueError, OverflowError, OSError):  # none, or no date a clock can show
        return "?"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
