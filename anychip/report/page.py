"""`anychip report`: one HTML file, viewable offline, with the run's summary and figures."""

from __future__ import annotations

import datetime
import html
import os
from pathlib import Path

from ..pools.timeline import Timeline, pool_dirs, timeline
from ..runfiles import write_file
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
    "pool_lost",
    "pool_recovered",
    "pool_step_discarded",
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
    A run of pools gets a page of its pools (timeline, losses, goodput) linking to a report per
    pool, written in each pool's directory. FileNotFoundError names a directory that holds no run."""
    out = Path(out) if out else Path(run_dir) / "report.html"
    if pool_dirs(run_dir):
        links = {d.name: write_report(d) for d in pool_dirs(run_dir) if (d / "events.jsonl").is_file()}
        text = render_pools(timeline(run_dir), Path(run_dir), links, out)
    else:
        text = render(load_run(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    # a new temporary name, renamed over the page: a browser reloading it never sees half of it, and
    # a link in the run directory (report.html, or a planted temporary) is never written through
    write_file(out.parent, out.name, text, durable=False)
    return out


def render_pools(t: Timeline, run_dir: Path, links: dict[str, Path], out: Path) -> str:
    """The page of a run of pools: which pool computed which steps, each loss of a pool."""
    fmt = lambda v: f"{v:.1f} s" if v is not None else "never"  # noqa: E731
    rows = []
    for pool in t.pools:
        g = t.goodputs.get(pool)
        steps = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b, _, _ in t.steps[pool]) or "none"
        rows.append([pool, steps, f"{100 * g.ratio:.1f}%" if g else "-"])
    losses = [
        [
            loss["pool"],
            f"+{loss['time'] - t.start:.1f} s",
            fmt(loss["next_step_s"]),
            fmt(loss["rejoin_s"]),
            fmt(loss["without_s"]),
        ]
        for loss in t.losses
    ]
    parts = [
        f"<h1>anychip run of pools <code>{_e(run_dir.name)}</code></h1>",
        f"<p>{len(t.pools)} pools, wall time {t.end - t.start:.1f} s, fleet goodput {100 * t.fleet_goodput:.1f}% "
        f"(productive time of every pool over the wall time of every pool); report written {_now()}</p>",
        "<h2>Pools</h2>",
        _table(["pool", "steps computed", "goodput"], rows),
    ]
    svg = plots.pools(t)
    if svg is not None:
        caption = "Each pool's steps at the wall time they finished; dotted: a pool lost, shaded: until it was back."
        parts.append(f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>")
    if losses:
        parts += [
            "<h2>Pools lost</h2>",
            _table(["pool", "lost at", "next step of the others", "back (live state taken)", "without it"], losses),
        ]
    if links:
        items = "".join(
            f'<li><a href="{_e(os.path.relpath(path, out.parent))}">{_e(pool)}</a></li>' for pool, path in links.items()
        )
        parts.append(f"<h2>Each pool</h2><ul>{items}</ul>")
    title = f"anychip report: {run_dir.name}"
    head = f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
    head += f"<style>{_CSS}</style></head><body>\n"
    return head + "\n".join(parts) + "\n</body></html>\n"


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
