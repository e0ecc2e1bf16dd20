"""`anychip report`: one HTML file, viewable offline, with the run's summary and figures."""

from __future__ import annotations

import datetime
import html
from pathlib import Path

from . import plots
from .run import Run, load_run
from .summary import fault_rows, overview

# Events listed under the timeline (checkpoints are only drawn: there are many).
NOTABLE = {
    "chaos_inject",
    "nonfinite",
    "spike",
    "rollback",
    "data_skipped",
    "update_skipped",
    "crash_detected",
    "hang_detected",
    "straggler",
    "replica_mismatch",
    "audit_mismatch",
    "faulty_hardware",
    "checkpoint_corrupt",
    "checkpoint_failed",
    "restart",
    "run_end",
    "rng_reseeded",
}

_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:64em;color:#222;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.4em 0 1em}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f5f5f5}.state{display:inline-block;padding:1px 8px;border-radius:4px;color:#fff}
.finished{background:#3a7d44}.running{background:#2f6db5}.failed,.stopped{background:#b33a3a}
.interrupted{background:#a6761d}figure{margin:0 0 1.2em}figcaption{color:#555;font-size:.9em}svg{max-width:100%;height:auto}
.note{color:#666}"""

_TIMELINE_CAPTION = (
    "Each dot is a step at the wall time it finished: blue steps count, orange ones were done again after a "
    "fault. Dashed lines: (re)starts; green ticks: committed checkpoints; crosses: faults (red shading: time "
    "they cost); triangles: detection; arrows: rollbacks. The bar splits the wall time as anychip goodput does."
)
_LOSS_CAPTION = (
    "Per step (the last run of each step when a fault made it run again); "
    "held-out: the main model's loss on fixed held-out batches every eval.interval steps."
)
_SPEED_CAPTION = "MFU against the device's peak at the training dtype (CPU: a measured matmul)."
_EXPERT_LOAD_CAPTION = (
    "Tokens routed to each expert per column (the steps since the column before; a long run's records are "
    "summed into at most 200 columns), divided by the layer's mean: 1 (white) is balanced, red experts get "
    "more than their share, blue ones less."
)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html) and return its path.
    FileNotFoundError names a directory that holds no run."""
    run = load_run(run_dir)
    out = Path(out) if out else Path(run_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(run))
    tmp.replace(out)  # a browser reloading the page never sees half of it
    return out


def render(run: Run) -> str:
    parts = [
        f"<h1>anychip run <code>{_e(run.path.name)}</code></h1>",
        f'<p><span class="state {run.state}">{run.state}</span> {_e(run.state_detail)} report written {_now()}</p>',
        "<h2>Summary</h2>",
        _table(["", ""], overview(run)),
    ]
    faults = fault_rows(run)
    if faults:
        parts += [
            "<h2>Faults by kind</h2>",
            _table(["kind", "count", "injected", "detected", "median detection latency", "time lost"], faults),
        ]
    figures = [
        ("Goodput timeline", plots.timeline(run), _TIMELINE_CAPTION),
        ("Loss", plots.loss(run), _LOSS_CAPTION),
        ("Optimizer", plots.optimizer(run), ""),
        ("Throughput and memory", plots.speed(run), _SPEED_CAPTION),
        ("Reinforcement learning", plots.grpo(run), "Rollout rewards by component, accuracy, KL and entropy."),
        ("Expert load", plots.expert_load(run), _EXPERT_LOAD_CAPTION),
    ]
    for title, svg, caption in figures:
        if svg is None:
            continue
        parts.append(f"<h2>{title}</h2><figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>")
    if not run.experts:
        parts.append(
            '<p class="note">No expert-load records (experts.jsonl): the run has no MoE layer, has not '
            "logged yet, or was made by an older anychip.</p>"
        )
    events = _notable(run)
    if events:
        parts += ["<h2>Events</h2>", _table(["time", "event", "step", "detail"], events)]
    title = f"anychip report: {run.path.name}"
    head = f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
    head += f"<style>{_CSS}</style></head><body>\n"
    return head + "\n".join(parts) + "\n</body></html>\n"


def _notable(run: Run) -> list[list[str]]:
    t0 = run.start.get("time", 0.0)
    out = []
    for e in run.events:
        if e["event"] not in NOTABLE and not (e["event"] == "run_start" and e.get("restart")):
            continue
        detail = {k: v for k, v in e.items() if k not in ("time", "event", "step")}
        text = ", ".join(f"{k}={v}" for k, v in detail.items())
        out.append([f"+{e['time'] - t0:.1f} s", e["event"], str(e.get("step", e.get("from_step", ""))), text[:300]])
    return out


def _table(columns: list[str], rows) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in columns) + "</tr>" if any(columns) else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _e(text) -> str:
    return html.escape(str(text))
