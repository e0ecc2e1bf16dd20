"""`anychip goodput`: where a run's wall time went, from its events and metrics.

    productive   step time of every step that counts toward the result
    recomputed   step time of steps done again after a crash (work lost)
    ckpt stall   time the loop stood still for a checkpoint (the save call, and any wait
                 for background staging before the next optimizer step)
    snap stall   the same for the snapshots in shared memory (metrics snapshot_s: the calls
                 since the previous record, between steps; snapshot_wait_s: waits within the
                 step for a background copy)
    in-process   restarts within the worker process after a fault: from the failure to the
                 state restored in a new process group (restart_in_process duration_s)
    restart      everything else between the first start and the last record:
                 process starts, resume, rendezvous, evaluation, time to detect a fault

The parts add up to the wall time by construction; goodput = productive / wall.

Faults. Each `chaos_inject` event is a fault injected on purpose. Its detection is the first
event, not already taken by an earlier injection, that answers its kind at or after it:
    kill, exception: worker_failed (the first rank to fail records origin true), crash_detected
                     or run_end (status "error")                     hang: hang_detected
    nan: nonfinite           bitflip: replica_mismatch               slow: straggler
    sdc: audit_mismatch      corrupt_checkpoint: checkpoint_corrupt  bad_batch: spike
    checkpoint_write: checkpoint_failed                             pool_loss: crash_detected
An injection with none is undetected. One hang is one fault: further hang_detected events of
the same start (other ranks' watchdogs) and the crash_detected its kill causes at the next
start are not counted; nor is the run_end of a run a guard stopped (the guard's event counts).
One failure is one fault: the worker_failed of ranks that failed because of another (origin
false), of the peers of a hung rank the watchdog killed, and the run_end and crash_detected
of a start in which a worker failed are not counted. Each detection event left over (faulty_hardware included) is a real fault, named by its event: crash_detected "crash", hang_detected "hang", run_end
"error", the others as they are; its step is the event's step (or last_step).

    latency      detection time - injection time; None when undetected or not injected
    time lost    from the injection (for a real fault: its detection) to the first metrics record
                 after the detection whose step >= the fault's step, less one median step_time
                 (the step that would have run anyway), at least 0; None when undetected, never
                 back to that step, or the fault has no step
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

from .events import EVENT, MAX_READ_BYTES, METRIC, fits, keep_fitting, read_jsonl, read_jsonl_tail
from .runread import printable

# a worker that dies on a rank other than 0 is seen by rank 0 as a failed collective: run_end "error"
DETECTED_BY = {
    "kill": ("worker_failed", "crash_detected", "run_end"),
    "exception": ("worker_failed", "run_end", "crash_detected"),
    "hang": ("hang_detected",),
    "nan": ("nonfinite",),
    "bitflip": ("replica_mismatch",),
    "slow": ("straggler",),
    "corrupt_checkpoint": ("checkpoint_corrupt",),
    "checkpoint_write": ("checkpoint_failed",),
    "bad_batch": ("spike",),
    "sdc": ("audit_mismatch",),
    "pool_loss": ("crash_detected",),  # in the lost pool's record; the others' see pool_lost (anychip.pools)
}
DETECTIONS = {*(e for kinds in DETECTED_BY.values() for e in kinds), "faulty_hardware"}
REAL_KIND = {"crash_detected": "crash", "hang_detected": "hang", "run_end": "error", "worker_failed": "crash"}


@dataclass
class Goodput:
    wall_s: float
    productive_s: float
    recomputed_s: float
    checkpoint_stall_s: float
    restart_s: float
    steps: int
    recomputed_steps: int
    restarts: int  # every restart: of the processes, and within them
    snapshot_stall_s: float = 0.0
    inprocess_restart_s: float = 0.0
    inprocess_restarts: int = 0
    # plain lists and dicts, so that `anychip goodput --json` can dump them as they are
    faults: list[dict] = field(default_factory=list)  # one per fault, in time order
    fault_summary: dict[str, dict] = field(default_factory=dict)  # kind -> counts, latency, lost
    skipped: list[str] = field(default_factory=list)  # what of the run's files was not read, and why

    @property
    def ratio(self) -> float:
        return self.productive_s / self.wall_s if self.wall_s > 0 else 0.0


def goodput(run_dir: str | Path) -> Goodput:
    """Split the wall time of ``run_dir``; raises FileNotFoundError without events.jsonl. Malformed records
    are left out, and said in ``skipped`` with what was not read (events.read_jsonl)."""
    run_dir = Path(run_dir)
    if not (run_dir / "events.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir / 'events.jsonl'}: not a run directory")
    events = keep_fitting(read_jsonl(run_dir / "events.jsonl"), EVENT)
    keys = ("step", "time", "step_time", "snapshot_s", "snapshot_wait_s")
    metrics = read_jsonl_tail(run_dir / "metrics.jsonl", MAX_READ_BYTES, METRIC, keys=keys)
    g = goodput_of(events, metrics)
    g.skipped = events.notes("events.jsonl") + metrics.notes("metrics.jsonl")
    return g


def goodput_of(events: list[dict], metrics: list[dict]) -> Goodput:
    """`goodput` of a run's records, already read; those not of their file's schema (events.EVENT,
    events.METRIC) are left out."""
    events = [e for e in events if fits(e, EVENT)]
    metrics = [m for m in metrics if fits(m, METRIC)]
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
    # snapshots: the call is outside the step's time, a wait for a background copy inside it
    waited = sum(m.get("snapshot_wait_s", 0.0) for m in metrics)
    productive = max(productive - waited, 0.0)
    snapshots = waited + sum(m.get("snapshot_s", 0.0) for m in metrics)
    in_process = [e for e in events if e["event"] == "restart_in_process" and e.get("rank", 0) == 0]
    in_process_s = sum(e.get("duration_s", 0.0) for e in in_process)
    restart = max(wall - productive - recomputed - stall - snapshots - in_process_s, 0.0)
    found = faults(events, metrics)
    return Goodput(
        wall,
        productive,
        recomputed,
        stall,
        restart,
        steps=len(last_index),
        recomputed_steps=len(metrics) - len(last_index),
        restarts=max(len(starts) - 1, 0),
        snapshot_stall_s=snapshots,
        inprocess_restart_s=in_process_s,
        inprocess_restarts=len(in_process),
        faults=found,
        fault_summary=summarize_faults(found),
    )


def faults(events: list[dict], metrics: list[dict]) -> list[dict]:
    """Injected and real faults with their detection, latency and time lost (module docstring)."""
    events = sorted(events, key=lambda e: e["time"])
    metrics = sorted(metrics, key=lambda m: m["time"])
    step_time = median(m["step_time"] for m in metrics) if metrics else 0.0

    def lost(start: float, detected: float, step: int | None) -> float | None:
        if step is None:
            return None
        back = next((m["time"] for m in metrics if m["time"] >= detected and m["step"] >= step), None)
        return None if back is None else max(back - start - step_time, 0.0)

    # run_end is a detection only with status "error"; no other detection event has a status
    detections = _drop_consequences(
        [e for e in events if e["event"] in DETECTIONS and e.get("status", "error") == "error"], events
    )
    matched: set[int] = set()
    out = []
    for inj in (e for e in events if e["event"] == "chaos_inject"):
        answered_by = DETECTED_BY.get(inj["kind"], ())
        answering = (
            i
            for i, d in enumerate(detections)
            if i not in matched and d["time"] >= inj["time"] and d["event"] in answered_by
        )
        i = next(answering, None)
        fault = {
            "kind": inj["kind"],
            "injected": True,
            "step": inj.get("step"),
            "rank": inj.get("rank"),
            "time": inj["time"],
            "detected_by": None,
            "detected_at": None,
            "latency_s": None,
            "lost_s": None,
        }
        if i is not None:
            d = detections[i]
            matched.add(i)
            fault |= {
                "detected_by": d["event"],
                "detected_at": d["time"],
                "latency_s": d["time"] - inj["time"],
                "lost_s": lost(inj["time"], d["time"], inj.get("step")),
            }
        out.append(fault)
    for i, d in enumerate(detections):
        if i not in matched:
            step = d.get("step", d.get("last_step"))
            real = {
                "kind": REAL_KIND.get(d["event"], d["event"]),
                "injected": False,
                "step": step,
                "rank": d.get("rank"),
                "time": d["time"],
                "detected_by": d["event"],
                "detected_at": d["time"],
                "latency_s": None,
                "lost_s": lost(d["time"], d["time"], step),
            }
            out.append(real)
    return sorted(out, key=lambda f: f["time"])


def _drop_consequences(detections: list[dict], events: list[dict]) -> list[dict]:
    """One hang is one fault: the watchdogs of the ranks waiting for the hung one fire too
    (same start of the job), and the next start records the killed worker as a crash."""
    starts = sorted(e["time"] for e in events if e["event"] == "run_start")

    def attempt(t: float) -> int:
        return sum(s <= t for s in starts)

    hung, failed = set(), set()
    out = []
    for d in detections:
        a = attempt(d["time"])
        if d["event"] == "worker_failed":
            if not d.get("origin", True) or a in hung or a in failed:
                continue  # a consequence: of another rank's failure, or of a hung rank's kill
            failed.add(a)
        if d["event"] == "hang_detected":
            if a in hung:
                continue
            hung.add(a)
        if d["event"] == "crash_detected" and (a in hung or a - 1 in hung or a in failed):
            continue  # logged by the next start just before its run_start (a hang's: or after)
        if d["event"] == "run_end" and (a in failed or a in hung):
            continue  # the failure's (or the hang's) own record counts
        if d["event"] == "run_end" and (d.get("error") or "").startswith("GuardStop"):
            continue  # the guard's own event is the detection
        out.append(d)
    return out


def summarize_faults(found: list[dict]) -> dict[str, dict]:
    """Per kind: count, injected, detected, median detection latency, total time lost (None if unknown)."""
    out: dict[str, dict] = {}
    for kind in dict.fromkeys(f["kind"] for f in found):
        fs = [f for f in found if f["kind"] == kind]
        latencies = [f["latency_s"] for f in fs if f["latency_s"] is not None]
        losses = [f["lost_s"] for f in fs if f["lost_s"] is not None]
        out[kind] = {
            "count": len(fs),
            "injected": sum(f["injected"] for f in fs),
            "detected": sum(f["detected_by"] is not None for f in fs),
            "median_latency_s": median(latencies) if latencies else None,
            "lost_s": sum(losses) if losses else None,
        }
    return out


def format_goodput(g: Goodput) -> str:
    rows = [
        ("productive steps", g.productive_s),
        ("recomputed (lost) steps", g.recomputed_s),
        ("checkpoint stalls", g.checkpoint_stall_s),
        ("snapshot stalls", g.snapshot_stall_s),
        ("in-process restarts", g.inprocess_restart_s),
        ("restarts, start-up, eval", g.restart_s),
    ]
    lines = [
        f"wall time {g.wall_s:.1f} s, {g.steps} steps, {g.recomputed_steps} recomputed, {g.restarts} restarts "
        f"({g.inprocess_restarts} in process)"
    ]
    for name, t in rows:
        share = 100 * t / g.wall_s if g.wall_s else 0.0
        lines.append(f"  {name:<26}{t:>9.1f} s  {share:5.1f}%")
    lines.append(f"goodput {100 * g.ratio:.1f}%")
    if g.fault_summary:
        lines.append(f"faults{'count':>22}{'injected':>10}{'detected':>10}{'latency':>12}{'lost':>12}")
        for kind, s in g.fault_summary.items():
            latency, lost = (f"{t:.2f} s" if t is not None else "-" for t in (s["median_latency_s"], s["lost_s"]))
            lines.append(
                f"  {printable(kind):<20}{s['count']:>6}{s['injected']:>10}{s['detected']:>10}{latency:>12}{lost:>12}"
            )
    lines += [f"skipped: {printable(note)}" for note in g.skipped]
    return "\n".join(lines)
