"""The report's figures, drawn with matplotlib and returned as inline SVG (text kept as text, so the
page is searchable and needs no network). Each function returns None when the run has nothing to show."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from .run import Run  # noqa: E402

plt.rcParams.update(
    {
        "svg.fonttype": "none",
        "font.size": 9,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "figure.dpi": 100,
        "svg.hashsalt": "anychip",  # same run, same file
    }
)
WIDE = (9.0, 3.0)
COLORS = {
    "productive": "#4c72b0",
    "recomputed": "#dd8452",
    "checkpoint": "#55a868",
    "fault": "#c44e52",
    "detected": "#ff9f1c",
    "restart": "#8172b3",
    "rollback": "#937860",
    "stall": "#55a868",
    "snapshots": "#8c8c8c",
    "in-process restarts": "#da8bc3",
    "start-up, eval": "#8172b3",
}


def to_svg(fig, drawn: bool = True) -> str | None:
    """The figure as an SVG element (None, and the figure closed, when nothing was drawn)."""
    if not drawn:
        plt.close(fig)
        return None
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG sits inside HTML


def _lines(
    ax,
    run: Run,
    keys: list[str],
    labels: list[str] | None = None,
    logy: bool = False,
    smooth: bool = True,
) -> bool:
    """One line per metric; long noisy series are drawn faint with their running mean on top."""
    drawn = False
    for key, label in zip(keys, labels or keys):
        steps, values = run.series(key)
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        if not finite:
            continue
        xs, ys = zip(*finite)
        if smooth and len(xs) >= 60:
            (raw,) = ax.plot(xs, ys, lw=0.7, alpha=0.3)
            ax.plot(xs, running_mean(ys, len(ys) // 30), lw=1.4, color=raw.get_color(), label=label)
        else:
            ax.plot(xs, ys, label=label, lw=1.2, marker="o" if len(xs) < 30 else None, ms=3)
        drawn = True
    if drawn:
        ax.set_xlabel("step")
        if logy and all(v > 0 for k in keys for v in run.series(k)[1]):
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(loc="best", frameon=False, fontsize=7)
    return drawn


def running_mean(values, window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def rollbacks(run: Run) -> list[dict]:
    """The run's rollback events that say from which step to which."""
    return [e for e in run.events if e["event"] == "rollback" and None not in (e.get("from_step"), e.get("to_step"))]


def _rollbacks(ax, run: Run) -> None:
    for e in rollbacks(run):
        ax.axvline(e["from_step"], color=COLORS["rollback"], ls=":", lw=1)
        ax.annotate(
            f"rollback to {e['to_step']}",
            (e["from_step"], 1),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            color=COLORS["rollback"],
            rotation=90,
            va="top",
            ha="right",
        )


def loss(run: Run) -> str | None:
    fig, ax = plt.subplots(figsize=WIDE)
    names = {"loss": "loss", "lm_loss": "lm_loss", "mtp_loss": "mtp_loss", "eval_loss": "held-out lm_loss"}
    keys = [k for k in names if run.series(k)[1]]
    if not _lines(ax, run, keys, [names[k] for k in keys], logy=not run.is_grpo):
        return to_svg(fig, drawn=False)
    _rollbacks(ax, run)
    title = "policy loss" if run.is_grpo else "training loss"
    if run.eval:
        title += f" (held-out accuracy after training: {run.eval['accuracy']:.1%})"
    ax.set_title(title)
    return to_svg(fig)


def optimizer(run: Run) -> str | None:
    fig, (a, b) = plt.subplots(1, 2, figsize=WIDE)
    shown = _lines(a, run, ["lr"], smooth=False)
    a.set_title("learning rate")
    shown |= _lines(b, run, ["grad_norm"], logy=True)
    b.set_title("gradient norm (before clipping)")
    return to_svg(fig, shown)


def speed(run: Run) -> str | None:
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(9.0, 2.8))
    shown = _lines(a, run, ["tokens_per_s"])
    a.set_title("tokens/s")
    if _lines(b, run, ["mfu"]):
        b.yaxis.set_major_formatter(PercentFormatter(1.0))
        shown = True
    b.set_title("MFU")
    shown |= _lines(c, run, ["memory_peak_gb"], smooth=False)
    c.set_title("peak memory (GiB)")
    fig.tight_layout()
    return to_svg(fig, shown)


def grpo(run: Run) -> str | None:
    if not run.is_grpo:
        return None
    components = sorted({k for m in run.metrics for k in m if k.startswith("reward/")})
    fig, axes = plt.subplots(1, 3, figsize=(9.0, 2.8))
    _lines(axes[0], run, ["reward", *components], ["reward", *(c.removeprefix("reward/") for c in components)])
    axes[0].set_title("reward (mean over completions)")
    _lines(axes[1], run, ["accuracy"])
    axes[1].set_title("rollout accuracy")
    _lines(axes[2], run, ["kl", "entropy"])
    axes[2].set_title("KL to the reference, entropy")
    fig.tight_layout()
    return to_svg(fig)


def expert_load(run: Run, max_layers: int = 12, max_columns: int = 200) -> str | None:
    """Per MoE layer: tokens per expert over time relative to the layer's mean (1 = balanced). At most
    `max_layers` layers and `max_columns` columns (adjacent records summed), the cells drawn as one image
    per layer: the figure's size does not grow with the run's length or its number of experts."""
    by_step = {r["step"]: r for r in run.experts if r.get("tokens")}  # after a restart, the last record counts
    records = [by_step[s] for s in sorted(by_step)]
    if not records:
        return None
    n_layers, n_experts = len(records[0]["tokens"]), len(records[0]["tokens"][0])
    records = [r for r in records if len(r["tokens"]) == n_layers and all(len(t) == n_experts for t in r["tokens"])]
    layers = list(range(n_layers))
    if n_layers > max_layers:  # evenly spaced, first and last included
        layers = sorted({round(i * (n_layers - 1) / (max_layers - 1)) for i in range(max_layers)})
    edges, tokens = merge_records(records, layers, max_columns)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(9.0, 1.9 * rows + 0.4), squeeze=False, sharex=True)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    image = None
    names = records[-1].get("layers") or []
    for ax, layer, grid in zip(axes.flat, layers, tokens):  # grid: [column, expert]
        mean = grid.mean(axis=1, keepdims=True)
        share = np.divide(grid, mean, out=np.ones_like(grid), where=mean > 0)
        image = ax.pcolormesh(edges, np.arange(n_experts + 1), share.T, cmap="RdBu_r", norm=norm, rasterized=True)
        name = names[layer] if len(names) == n_layers else f"MoE layer {layer + 1}"
        ax.set_title(f"{name} (MoE {layer + 1} of {n_layers})", fontsize=8)
        ax.set_ylabel("expert")
        ax.grid(False)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.colorbar(image, ax=axes, shrink=0.8, label="tokens / layer mean")
    return to_svg(fig)


def merge_records(records: list[dict], layers: list[int], max_columns: int) -> tuple[list[int], list[np.ndarray]]:
    """The expert records (in step order, each the tokens since the one before) as at most `max_columns`
    columns, each the sum of adjacent records: (column edges in steps, from 0; per layer in `layers` an
    array [column, expert])."""
    per_column = math.ceil(len(records) / max_columns)
    groups = [records[i : i + per_column] for i in range(0, len(records), per_column)]
    edges = [0] + [g[-1]["step"] for g in groups]
    grids = [
        np.array([np.sum([r["tokens"][layer] for r in g], axis=0) for g in groups], dtype=float) for layer in layers
    ]
    return edges, grids


def timeline(run: Run) -> str | None:
    """Step against wall time, with every start, checkpoint, fault, detection and rollback marked, and the
    split of wall time that goodput is made of."""
    starts = [e["time"] for e in run.events if e["event"] == "run_start"]
    if not starts:
        return None
    t0 = starts[0]
    g = run.goodput
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(9.0, 4.2), height_ratios=[4, 1])
    last_index = {m["step"]: i for i, m in enumerate(run.metrics)}
    for kind, keep in (("productive", True), ("recomputed", False)):
        pts = [(m["time"] - t0, m["step"]) for i, m in enumerate(run.metrics) if (last_index[m["step"]] == i) == keep]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=4, color=COLORS[kind], label=f"{kind} steps", zorder=3)
    top = max([m["step"] for m in run.metrics], default=1)
    for i, t in enumerate(starts):
        ax.axvline(t - t0, color=COLORS["restart"], ls="--", lw=1, label="start / restart" if i == 0 else None)
    commits = [e for e in run.events if e["event"] == "checkpoint_commit"]
    if commits:
        ax.scatter(
            [e["time"] - t0 for e in commits],
            [e["step"] for e in commits],
            marker="|",
            s=60,
            color=COLORS["checkpoint"],
            label="checkpoint committed",
            zorder=4,
        )
    for j, f in enumerate(g.faults):
        step = f["step"] if f["step"] is not None else 0
        fault_label = "fault (injected or detected)" if j == 0 else None
        ax.scatter([f["time"] - t0], [step], marker="x", s=40, color=COLORS["fault"], zorder=5, label=fault_label)
        ax.annotate(
            f["kind"],
            (f["time"] - t0, step),
            fontsize=7,
            color=COLORS["fault"],
            xytext=(3, 3),
            textcoords="offset points",
        )
        if f["detected_at"] is not None and f["injected"]:
            detected_label = "detected" if j == 0 else None
            detected_at = f["detected_at"] - t0
            ax.scatter(
                [detected_at], [step], marker="v", s=25, color=COLORS["detected"], zorder=5, label=detected_label
            )
        if f["lost_s"]:
            ax.axvspan(f["time"] - t0, f["time"] - t0 + f["lost_s"], color=COLORS["fault"], alpha=0.08, lw=0)
    for e in rollbacks(run):
        arrow = {"arrowstyle": "->", "color": COLORS["rollback"]}
        ax.annotate("", (e["time"] - t0, e["to_step"]), (e["time"] - t0, e["from_step"]), arrowprops=arrow)
    ax.set_ylim(0, top * 1.05 + 1)
    ax.set_xlabel("seconds since the first start")
    ax.set_ylabel("step")
    ax.set_title(f"goodput timeline: {g.ratio:.1%} of {g.wall_s:.0f} s productive")
    ax.legend(loc="upper left", frameon=False, fontsize=7)
    parts = [
        ("productive", g.productive_s),
        ("recomputed", g.recomputed_s),
        ("stall", g.checkpoint_stall_s),
        ("snapshots", g.snapshot_stall_s),
        ("in-process restarts", g.inprocess_restart_s),
        ("start-up, eval", g.restart_s),
    ]
    left = 0.0
    for name, seconds in parts:
        bar.barh([0], [seconds], left=left, color=COLORS[name], label=f"{name} {seconds:.1f} s")
        left += seconds
    bar.set_yticks([])
    bar.set_xlabel(
        "wall time (s): productive steps, recomputed steps, checkpoint and snapshot stalls, restarts, start-up and eval"
    )
    bar.legend(loc="upper center", bbox_to_anchor=(0.5, -0.9), ncol=3, frameon=False, fontsize=7)
    bar.grid(False)
    fig.tight_layout()
    return to_svg(fig)


def pools(t) -> str | None:
    """A run of pools (anychip.pools.timeline.Timeline): each pool's steps at the wall time they
    finished, and the time each lost pool was away (shaded in its colour)."""
    if not any(t.steps.values()):
        return None
    fig, ax = plt.subplots(figsize=WIDE)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, pool in enumerate(t.pools):
        colour = palette[i % len(palette)]
        runs: list[list[tuple[float, int]]] = []  # one line per run of consecutive steps, in record order
        for step, time in t.points.get(pool, []):
            if not runs or step != runs[-1][-1][1] + 1:
                runs.append([])
            runs[-1].append((time - t.start, step))
        for n, run in enumerate(runs):
            xs, ys = zip(*run)
            ax.plot(xs, ys, color=colour, lw=1.5, marker=".", ms=3, label=pool if n == 0 else None)
        for loss in t.losses:
            if loss["pool"] == pool:
                x0 = loss["time"] - t.start
                ax.axvspan(x0, x0 + loss["without_s"], color=colour, alpha=0.15)
                ax.axvline(x0, color=COLORS["fault"], ls=":", lw=1)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("step")
    ax.legend(loc="upper left", frameon=False)
    return to_svg(fig)
