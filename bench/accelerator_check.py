"""A few minutes on a borrowed GPU or NPU: what anychip does there, in one JSON file.

1. train     30 `tiny` steps on the device in bfloat16 and in float32, and the same 30 steps
             on the CPU in float32 (the reference): tokens/s, MFU, step time and peak memory
             from each run's metrics.jsonl, and the largest relative difference of the
             per-step loss from the CPU reference, per dtype. Same settings for all three runs.
2. checkpoint  the float32 device run's last checkpoint (a DCP directory written on the
             device) loaded on the CPU and onto the device again: every tensor bit-equal to
             the run's final weights.
3. qualify   `anychip qualify --device <it> --reference cpu` in its quick shapes: status,
             failed checks, step parity, and the path of its report card.
4. plan      what `anychip plan` predicts for these runs (FLOPs per step, step memory
             growth, optimizer state) next to what was measured: the achieved FLOP/s and MFU
             of the planner's FLOP count against the device layer's peak, and the memory.

Every part runs on its own: one that fails records its error and the others still run. The
JSON (rewritten after each part, so an interrupted check leaves what it had) also records
the date (UTC), device name, torch version, anychip commit and the wall time of each part.
The device is reached only through anychip's device layer (anychip/device), never by name.

    python bench/accelerator_check.py [--device cuda|npu|xpu|mps|cpu] [--out DIR] [--quick]
                                      [--steps 30] [--batch 16] [--seq-len 128]

Default device: $ANYCHIP_DEVICE, else the first accelerator found, else the CPU. --quick (3
steps of 4 sequences, smaller qualify shapes) is a smoke test of the script itself on a CPU.
Writes DIR/accelerator_check.json (default DIR: runs/accelerator-check-<device>-<date-time>),
the runs under DIR/runs/ and the qualify report card under DIR/qualify/.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anychip.device import get_device  # noqa: E402

GiB = 2**30
# Settings every training run of the check shares (the device and the dtype come on top). The
# spike guard is off so that no rollback changes one run's trajectory and not another's; the
# watchdog is off since the runs are in this process, one after another (no sidecar processes).
RUN_SETTINGS = [
    "model.preset=tiny",
    "eval.n=0",
    "eval.interval=0",
    "log.tensorboard=false",
    "log.progress=false",
    "guards.spike=false",
    "guards.watchdog=false",
]
# `anychip qualify` in shapes smaller than its defaults (2048 tokens, 3 parity steps of 4 x 64),
# which still run every op, dtype and step-parity check and write the report card.
QUALIFY_FLAGS = ["--tokens", "512", "--seq", "128", "--steps", "2", "--parity-batch", "2", "--parity-seq", "32"]
QUALIFY_QUICK = ["--tokens", "256", "--seq", "64", "--steps", "1", "--parity-batch", "2", "--parity-seq", "16"]


# -- the parts -------------------------------------------------------------------------------------


def train_part(a, device, out: Path, keep: dict) -> dict:
    """bf16 and float32 runs on the device, a float32 run on the CPU, and the losses compared."""
    runs = {}
    device_dtypes = ["bfloat16", "float32"] if device.supports_dtype(torch.bfloat16) else ["float32"]
    todo = [(dtype, device, dtype, f"{device.type}-{dtype}", keep) for dtype in device_dtypes]
    todo.append(("cpu_reference", get_device("cpu"), "float32", "reference-cpu-float32", None))
    for name, dev, dtype, directory, kept in todo:
        runs[name] = guarded(train_run, a, dev, dtype, out / "runs" / directory, kept)
        runs[name].setdefault("run_dir", str(out / "runs" / directory))  # also when the run failed
    reference = runs["cpu_reference"].get("losses")
    compared = {}
    for dtype in device_dtypes:
        losses = runs[dtype].get("losses")
        if losses and reference:
            compared[dtype] = compare_losses(losses, reference)
    return {"runs": runs, "loss_vs_cpu": compared}


def train_run(a, device, dtype: str, run_dir: Path, keep: dict | None) -> dict:
    """One `anychip train` run in this process; its figures from metrics.jsonl and events.jsonl.
    ``keep`` (device runs) receives the final model, for the checkpoint part."""
    from anychip.config import load_config
    from anychip.parallel import unwrap
    from anychip.train.loop import train
    from anychip.train.runlog import read_jsonl

    if run_dir.exists():  # a run directory left by an earlier check would be resumed, not rerun
        shutil.rmtree(run_dir)
    sets = [*RUN_SETTINGS, *run_shape(a), f"device.type={device.type}", f"train.dtype={dtype}"]
    gc.collect()
    device.synchronize()
    device.reset_peak_memory()
    before = device.memory_stats()["allocated"]
    start = time.perf_counter()
    state = train(load_config(None, sets), run_dir)
    wall = time.perf_counter() - start
    after = device.memory_stats()["allocated"]  # weights and AdamW moments still held; no gradients
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    events = read_jsonl(run_dir / "events.jsonl")
    if keep is not None:
        keep[dtype] = {"model": unwrap(state.model), "run_dir": run_dir}
    del state
    gc.collect()
    timed = metrics[a.warmup :] if len(metrics) > a.warmup else metrics
    peak = max(m["memory_peak_gb"] for m in metrics) * GiB
    step_s = statistics.median(m["step_time"] for m in timed)
    # anychip's tokens and FLOPs of a step (the same every step) over the median step time
    tokens, mfu = metrics[0]["tokens_per_s"] * metrics[0]["step_time"], metrics[0].get("mfu")
    routine = {"run_start", "run_end", "guards", "checkpoint_save", "checkpoint_commit"}
    end = next((e for e in reversed(events) if e["event"] == "run_end"), {})
    return {
        "device": device.type,
        "dtype": dtype,
        "run_dir": str(run_dir),
        "run_wall_s": wall,
        "status": end.get("status"),
        "steps": len(metrics),
        "timed_steps": len(timed),
        "step_time_median_s": step_s,
        "first_step_time_s": metrics[0]["step_time"],
        "step_times_s": [m["step_time"] for m in metrics],
        "tokens_per_s": tokens / step_s,
        "mfu": mfu * metrics[0]["step_time"] / step_s if mfu is not None else None,
        "peak_flops": device.peak_flops(getattr(torch, dtype)),
        "peak_memory_bytes": peak,
        "memory_before_bytes": before,
        "memory_after_bytes": after,
        # what a step adds to the weights and optimizer state: an allocator's figure only (a process's
        # resident set does not shrink after the steps, so on the CPU it says nothing)
        "memory_step_growth_bytes": None if device.type == "cpu" else peak - after,
        "memory_kind": "process resident set (whole process)" if device.type == "cpu" else "allocator (tensors)",
        "losses": [m["loss"] for m in metrics],
        "grad_norms": [m["grad_norm"] for m in metrics],
        "other_events": [e for e in events if e["event"] not in routine],
    }


def compare_losses(losses: list[float], reference: list[float]) -> dict:
    n = min(len(losses), len(reference))
    rel = [abs(x - r) / abs(r) if r else math.inf for x, r in zip(losses[:n], reference[:n])]
    worst = max(range(n), key=rel.__getitem__)
    return {
        "steps_compared": n,
        "max_rel_diff": rel[worst],
        "max_rel_diff_step": worst + 1,
        "first_step_rel_diff": rel[0],
        "last_step_rel_diff": rel[-1],
        "last_loss": losses[n - 1],
        "last_loss_cpu": reference[n - 1],
    }


def checkpoint_part(device, keep: dict) -> dict:
    """The device run's final checkpoint, loaded on the CPU and on the device, against its final weights."""
    from anychip.checkpoint import committed
    from anychip.export import checkpoint_model

    dtype = "float32" if "float32" in keep else next(iter(keep), None)
    if dtype is None:
        raise RuntimeError("no device training run finished: no checkpoint to check")
    model, run_dir = keep[dtype]["model"], keep[dtype]["run_dir"]
    directory = committed(run_dir / "checkpoints")[0]  # the newest: the last step's
    final = model.state_dict()  # on the device
    final_cpu = {k: v.detach().cpu() for k, v in final.items()}
    start = time.perf_counter()
    on_cpu, meta = checkpoint_model(directory, device="cpu")
    load_cpu_s = time.perf_counter() - start
    cpu_state = on_cpu.state_dict()
    moved = {k: v.to(device.torch_device()) for k, v in cpu_state.items()}  # loaded on the CPU, then to the device
    start = time.perf_counter()
    on_device, _ = checkpoint_model(directory, device=device.torch_device())
    device.synchronize()
    load_device_s = time.perf_counter() - start
    checks = {
        "device_weights_vs_cpu_load": compare_states(final_cpu, cpu_state),
        "cpu_load_moved_to_device_vs_device_weights": compare_states(final, moved),
        "device_load_vs_device_weights": compare_states(final, on_device.state_dict()),
        "device_load_back_on_cpu_vs_cpu_load": compare_states(
            cpu_state, {k: v.cpu() for k, v in on_device.state_dict().items()}
        ),
    }
    return {
        "run": dtype,
        "checkpoint": str(directory),
        "checkpoint_step": meta.get("step"),
        "run_steps": run_steps(run_dir),
        "checkpoint_bytes": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
        "load_cpu_s": load_cpu_s,
        "load_device_s": load_device_s,
        "bit_equal": all(c["bit_equal"] for c in checks.values()),
        "checks": checks,
    }


def run_steps(run_dir: Path) -> int:
    from anychip.train.runlog import read_jsonl

    return len(read_jsonl(run_dir / "metrics.jsonl"))


def compare_states(expected: dict, got: dict) -> dict:
    """Tensors of two state dicts compared with torch.equal (same names, dtypes and shapes too)."""
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    differ = []
    for name in sorted(set(expected) & set(got)):
        x, y = expected[name], got[name]
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device or not torch.equal(x, y):
            differ.append(
                f"{name} ({x.dtype}, {tuple(x.shape)}, {x.device} vs {y.dtype}, {tuple(y.shape)}, {y.device})"
            )
    return {
        "bit_equal": not (missing or extra or differ),
        "tensors": len(set(expected) & set(got)),
        "elements": sum(t.numel() for t in expected.values()),
        "missing": missing[:10],
        "extra": extra[:10],
        "differ": differ[:10],
        "differ_count": len(differ),
    }


def qualify_part(a, device, out: Path) -> dict:
    """`anychip qualify` in a subprocess (as a person would run it); its report summarised."""
    target = out / "qualify"
    flags = QUALIFY_QUICK if a.quick else QUALIFY_FLAGS
    argv = [sys.executable, "-m", "anychip.cli", "qualify", "--device", device.type, "--reference", "cpu"]
    argv += ["--out", str(target), *flags]
    report_path = target / "qualify.json"
    report_path.unlink(missing_ok=True)  # so that a stale report is never read as this one
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=a.qualify_timeout)
    result = {
        "command": "anychip qualify " + " ".join(argv[4:]),
        "exit_code": p.returncode,
        "output_tail": (p.stdout + p.stderr)[-2000:],
        "report_json": str(report_path),
        "report_card": str(target / "qualify.md"),
        "report_html": str(target / "qualify.html"),
    }
    if not report_path.exists():
        raise RuntimeError(f"anychip qualify wrote no report (exit {p.returncode}): {result['output_tail'][-800:]}")
    return result | summarize_qualify(json.loads(report_path.read_text()))


def summarize_qualify(r: dict) -> dict:
    rank = r["ranks"][0]
    ops = [
        {
            "op": row["op"],
            "dtype": row["dtype"],
            "status": row["status"],
            "reason": row.get("reason", ""),
            "rel_error": (row.get("target") or {}).get("rel_rms"),
            "error_ratio": row.get("error_ratio"),
            "peak_pct": (row.get("target_speed") or {}).get("peak_pct"),
        }
        for row in rank["ops"]
    ]
    counts: dict[str, int] = {}
    for row in ops:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    parity = [
        {
            "dtype": p["dtype"],
            "status": p["status"],
            "first_divergent": p.get("first_divergent"),
            "losses": [s["loss"] for s in p.get("per_step", [])],
            "grad_cosine_min": [s["grad_cosine_min"] for s in p.get("per_step", [])],
        }
        for p in rank["parity"]
    ]
    return {
        "status": r["status"],
        "target": r["target"],
        "reference": r["reference"]["name"],
        "op_status_counts": counts,
        "not_passed": [row for row in ops if row["status"] != "pass"],
        "ops": ops,
        "parity": parity,
    }


def plan_part(a, device, train: dict | None) -> dict:
    """`anychip plan`'s figures for the runs' shape next to the measured step time and memory."""
    from anychip.config import load_config
    from anychip.data import load_tokenizer
    from anychip.plan.activations import saved_bytes
    from anychip.plan.estimate import shapes, step_growth
    from anychip.plan.flops import step_flops_per_sequence

    cfg = load_config(None, [*RUN_SETTINGS, *run_shape(a)])
    args = cfg.model_args(load_tokenizer(cfg.data.tokenizer).vocab_size)
    batch, seq = cfg.train.global_batch, cfg.train.seq_len
    flops = step_flops_per_sequence(args, seq) * batch
    growth = step_growth(args, batch, seq, "none")
    activations = saved_bytes(args, batch, seq).activations("none")
    state = 16 * shapes(args).total  # float32 weights, gradients and AdamW's two moments, as `plan` counts them
    runs = (train or {}).get("runs", {})
    out = {
        "model": cfg.model.preset,
        "parameters": shapes(args).total,
        "global_batch": batch,
        "seq_len": seq,
        "planned_flops_per_step": flops,
        "planned_step_growth_float32_bytes": growth,
        "planned_state_bytes": state,
        "runs": {},
    }
    for name, run in runs.items():
        dtype = run.get("dtype") or ("float32" if name == "cpu_reference" else name)
        dev = get_device("cpu") if name == "cpu_reference" else device
        peak = dev.peak_flops(getattr(torch, dtype))
        scaled = activations * (2 if dtype != "float32" else 4) / 4  # `plan` scales activations to the compute dtype
        row = {
            "device": dev.type,
            "dtype": dtype,
            "peak_flops": peak,
            "planned_activations_at_dtype_bytes": scaled,
            "planned_peak_bytes": state + growth,
            "planned_peak_at_dtype_bytes": state + scaled,
        }
        step_s = run.get("step_time_median_s")
        if step_s:
            achieved = flops / step_s
            measured = run["memory_step_growth_bytes"]
            row |= {
                "measured_step_time_s": step_s,
                "achieved_flops_per_s": achieved,
                "mfu_planner_flops": achieved / peak if peak else None,
                "mfu_anychip_metrics": run.get("mfu"),
                "measured_peak_bytes": run["peak_memory_bytes"],
                "measured_step_growth_bytes": measured,
                "planned_over_measured_peak": (state + growth) / run["peak_memory_bytes"],
                "planned_over_measured_growth": growth / measured if measured and measured > 0 else None,
                "planned_at_dtype_over_measured_growth": scaled / measured if measured and measured > 0 else None,
            }
        out["runs"][name] = row
    return out


# -- the frame -------------------------------------------------------------------------------------


def run_shape(a) -> list[str]:
    interval = a.steps  # one checkpoint, of the last step (and the guards' one of step 0)
    return [
        f"train.steps={a.steps}",
        f"train.global_batch={a.batch}",
        f"train.seq_len={a.seq_len}",
        f"checkpoint.interval={interval}",
    ]


def guarded(fn, *args) -> dict:
    """fn(*args) with its wall time; an exception becomes an "error" entry instead of stopping the check."""
    start = time.perf_counter()
    try:
        result, error, trace = fn(*args) or {}, None, None
    except Exception as e:  # any failure of one part must leave the others
        result, error, trace = {}, f"{type(e).__name__}: {e}", traceback.format_exc(limit=-8)
    result = {**result, "wall_s": time.perf_counter() - start, "error": error}
    if trace:
        result["traceback"] = trace
    return result


def commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def describe(device) -> dict:
    dtypes = [d for d in ("float32", "bfloat16", "float16") if device.supports_dtype(getattr(torch, d))]
    return {
        "type": device.type,
        "name": device.name(),
        "count": device.device_count(),
        "dtypes": dtypes,
        "peak_flops": {d: device.peak_flops(getattr(torch, d)) for d in dtypes},
        "peak_source": "measured matmul" if device.type == "cpu" else "device table (anychip/device/flops.py)",
    }


def summary(result: dict) -> list[str]:
    """The few lines a person reads first."""
    d, parts = result.get("device", {}), result["parts"]
    lines = [
        f"accelerator_check: {d.get('name', 'no device')} ({d.get('type') or d.get('requested') or 'auto'}), torch {result['torch']}, "
        f"anychip {result['anychip_commit']}, {result['wall_s']:.0f} s"
    ]
    if d.get("error"):
        lines.append(f"  device      ERROR {d['error']}")
    t = parts.get("train", {})
    for name, run in t.get("runs", {}).items():
        if run.get("error"):
            lines.append(f"  train {name:<14} ERROR {run['error']}")
            continue
        mfu = f"{100 * run['mfu']:.2f}%" if run.get("mfu") is not None else "n/a"
        vs = t.get("loss_vs_cpu", {}).get(name)
        diff = f"  loss max rel diff vs cpu {vs['max_rel_diff']:.2e} (step {vs['max_rel_diff_step']})" if vs else ""
        lines.append(
            f"  train {name:<14} {run['step_time_median_s'] * 1e3:8.1f} ms/step  {run['tokens_per_s']:10,.0f} tok/s  "
            f"MFU {mfu:>7}  peak {run['peak_memory_bytes'] / GiB:.2f} GiB{diff}"
        )
    if "checkpoint" in parts:
        c = parts["checkpoint"]
        lines.append(
            f"  checkpoint  ERROR {c['error']}"
            if c.get("error")
            else f"  checkpoint  {c['checkpoint']}: bit-equal on cpu and device: {c['bit_equal']}"
        )
    if "qualify" in parts:
        q = parts["qualify"]
        lines.append(
            f"  qualify     ERROR {q['error']}"
            if q.get("error")
            else f"  qualify     {q['status'].upper()} {q['op_status_counts']}; card {q['report_card']}"
        )
    p = parts.get("plan", {})
    if p.get("error"):
        lines.append(f"  plan        ERROR {p['error']}")
    for name, row in p.get("runs", {}).items():
        if "measured_step_time_s" not in row:
            continue
        mfu = f"{100 * row['mfu_planner_flops']:.2f}%" if row.get("mfu_planner_flops") is not None else "n/a"
        measured = row["measured_step_growth_bytes"]
        lines.append(
            f"  plan {name:<15} {row['achieved_flops_per_s'] / 1e12:.3f} TFLOP/s (MFU {mfu}); peak memory planned "
            f"{row['planned_peak_bytes'] / GiB:.2f} GiB, measured {row['measured_peak_bytes'] / GiB:.2f} GiB; step "
            f"growth planned {mb(p['planned_step_growth_float32_bytes'])} (float32; at {row['dtype']} "
            f"{mb(row['planned_activations_at_dtype_bytes'])}), measured {mb(measured)}"
        )
    return lines


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MB"


def write(result: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda, npu, xpu, mps or cpu (default: $ANYCHIP_DEVICE, else auto)")
    p.add_argument("--out", type=Path, help="output directory (default runs/accelerator-check-<device>-<date-time>)")
    p.add_argument("--quick", action="store_true", help="3 steps of 4 sequences, small qualify shapes: a smoke test")
    p.add_argument("--steps", type=int, help="training steps of each run (default 30; --quick 3)")
    p.add_argument("--batch", type=int, help="sequences per step (default 16; --quick 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--warmup", type=int, help="first steps left out of the medians (default 5; --quick 1)")
    p.add_argument("--qualify-timeout", type=float, default=240.0, help="seconds before qualify is stopped")
    a = p.parse_args(argv)
    a.steps = a.steps or (3 if a.quick else 30)
    a.batch = a.batch or (4 if a.quick else 16)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 5)
    start = time.perf_counter()
    now = datetime.datetime.now(datetime.timezone.utc)
    result: dict = {
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "anychip_commit": commit(),
        "host": {"cpu": get_device("cpu").name(), "threads": torch.get_num_threads()},
        "settings": {
            "quick": a.quick,
            "steps": a.steps,
            "global_batch": a.batch,
            "seq_len": a.seq_len,
            "warmup": a.warmup,
            "run_settings": [*RUN_SETTINGS, *run_shape(a)],
        },
        "device": None,  # filled in below
        "parts": {},
    }
    try:
        device = get_device(a.device)
        result["device"] = describe(device)
    except Exception as e:  # no device, no check: say why in the file
        device, result["device"] = None, {"requested": a.device, "error": f"{type(e).__name__}: {e}"}
    out = (
        a.out
        or ROOT / "runs" / f"accelerator-check-{device.type if device else a.device or 'auto'}-{now:%Y%m%d-%H%M%S}"
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accelerator_check.json"
    if device is not None:
        keep: dict = {}
        parts = (
            ("train", lambda: train_part(a, device, out, keep)),
            ("checkpoint", lambda: checkpoint_part(device, keep)),
            ("qualify", lambda: qualify_part(a, device, out)),
            ("plan", lambda: plan_part(a, device, result["parts"].get("train"))),
        )
        for name, fn in parts:
            print(f"accelerator_check: {name} ...", flush=True)
            result["parts"][name] = guarded(fn)
            result["wall_s"] = time.perf_counter() - start
            write(result, path)
    result["wall_s"] = time.perf_counter() - start
    result["summary"] = summary(result)
    write(result, path)
    print("\n".join(result["summary"]))
    print(f"written: {path}")
    runs = result["parts"].get("train", {}).get("runs", {}).values()
    failed = device is None or any(part.get("error") for part in [*result["parts"].values(), *runs])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
