"""Memory of a real-size start: 8 gloo processes, FSDP2, a 0.4B-parameter MoE model.

Each worker's resident set is read from outside (/proc/PID/status: VmRSS and the high-water
mark VmHWM) when rank 0 writes ``run_start`` and until the worker exits; the same run with
the ``debug`` preset gives each rank's overhead (interpreter, torch, gloo, buffers). The
figures are (worker - overhead) / P, P = the model's float32 bytes, per rank:

    start_random   random init: the resident set when run_start is written
    start_hf       model.init_from = a Hugging Face directory of that model (the first run's final/)
    sft_peak       the whole 1-step SFT run (build, step, AdamW state, final save)
    grpo_peak      a 2-step `anychip grpo --nproc 8` from the SFT run (sharded reference, sampling
                   from the sharded policy), over a debug GRPO run's overhead

and beside them ``anychip plan``'s predicted peak per rank for the same layout. Sharded state
after a step is 4 P / 8 = 0.5 P (weights, gradients, AdamW's two moments).

    python bench/sharded_memory.py [--nproc 8] [--out bench/results/sharded_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIG = [  # v2-lite shapes cut down, MTP off
    "model.preset=v2-lite",
    "model.hidden_size=1024",
    "model.num_hidden_layers=10",
    "model.n_routed_experts=16",
    "model.moe_intermediate_size=512",
    "model.vocab_size=16384",
    "model.num_nextn_predict_layers=0",
]
DEBUG = ["model.preset=debug"]
COMMON = [
    "train.steps=1",
    "train.global_batch=8",
    "train.seq_len=32",
    "train.warmup_steps=0",
    "train.mode=pretrain",
    "eval.n=0",
    "checkpoint.interval=0",
    "checkpoint.snapshot_interval=0",
    "log.tensorboard=false",
    "log.progress=false",
    "device.type=cpu",
    "guards.watchdog=false",
    "parallel.max_restarts=0",
    "parallel.spare_workers=0",
]
GRPO = [
    "train.steps=2",
    "train.warmup_steps=0",
    "eval.n=0",
    "checkpoint.interval=0",
    "checkpoint.snapshot_interval=0",
    "log.tensorboard=false",
    "log.progress=false",
    "device.type=cpu",
    "guards.watchdog=false",
    "guards.spike=false",
    "parallel.max_restarts=0",
    "parallel.spare_workers=0",
    "grpo.prompts_per_step=8",
    "grpo.group_size=2",
    "grpo.max_new_tokens=6",
    "grpo.beta=0.04",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def workers(root: int) -> list[int]:
    """Worker processes under ``root``: descendants running anychip's worker."""
    import psutil

    try:
        procs = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "anychip.launch" in cmd:
            out.append(p.pid)
    return out


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def run(command: list[str], run_dir: Path) -> dict:
    """``sample(command, run_dir)``; once more, afresh, when it fails (a worker's teardown
    was seen to abort once in ten 8-process runs here: "terminate called without an active
    exception", after the run had ended)."""
    try:
        return sample(command, run_dir)
    except RuntimeError as e:
        print(f"{e}\nretrying once", flush=True)
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        return {**sample(command, run_dir), "retried": True}


def sample(command: list[str], run_dir: Path) -> dict:
    """Run ``command``; sample every worker until it exits. Returns per rank: rss and hwm when
    run_start appeared, and the last hwm seen."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    at_start: dict[int, dict] = {}
    last: dict[int, dict] = {}
    ranks: dict[int, int] = {}
    events = run_dir / "events.jsonl"
    while proc.poll() is None:
        pids = workers(proc.pid)
        for pid in pids:
            if pid not in ranks and (r := rank_of(pid)) is not None:
                ranks[pid] = r
        samples = {ranks[p]: s for p in pids if p in ranks and (s := status(p))}
        for r, s in samples.items():
            last[r] = s
        if not at_start and events.is_file() and '"run_start"' in events.read_text():
            at_start = samples
        time.sleep(0.02)
    reader.join(timeout=5)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{''.join(out)[-4000:]}")
    start_event = next(json.loads(line) for line in events.read_text().splitlines() if '"run_start"' in line)
    return {
        "start_rss": {r: s["VmRSS"] for r, s in at_start.items()},
        "start_hwm": {r: s["VmHWM"] for r, s in at_start.items()},
        "peak": {r: s["VmHWM"] for r, s in last.items()},
        "build_peak_bytes": start_event.get("build_peak_bytes"),
    }


def cli(mode: str, run_dir: Path, nproc: int, sets: list[str], init: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "anychip.cli", mode, "--nproc", str(nproc), "--run-dir", str(run_dir)]
    if init is not None:
        cmd += ["--init", str(init)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def excess(big: dict, base: dict, key: str, p_bytes: int) -> dict[int, float]:
    return {r: (big[key][r] - base[key].get(r, 0)) / p_bytes for r in sorted(big[key])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nproc", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    from anychip.config import load_config
    from anychip.models import count_parameters
    from anychip.plan.chips import CHIPS
    from anychip.plan.estimate import Assumptions, Layout, estimate

    cfg = load_config(None, [*COMMON, *BIG])
    params, _ = count_parameters(cfg.model_args(259), include_mtp=True)
    p_bytes = 4 * params
    root = Path(tempfile.mkdtemp(prefix="sharded-memory-"))
    n = a.nproc
    fsdp = ["parallel.strategy=fsdp"]
    print(f"model: {params / 1e6:.1f}M parameters, P = {p_bytes / 1e9:.3f} GB fp32; {n} processes, FSDP2", flush=True)
    debug = run(cli("train", root / "debug", n, [*COMMON, *DEBUG, *fsdp]), root / "debug")
    big = run(cli("train", root / "big", n, [*COMMON, *BIG, *fsdp]), root / "big")
    no_mtp = "model.num_nextn_predict_layers=0"  # the config's default of 1 would differ from the model's
    init = [*COMMON, f"model.init_from={root / 'big' / 'final'}", no_mtp, *fsdp]
    hf = run(cli("train", root / "hf", n, init), root / "hf")
    debug_rl = run(cli("grpo", root / "debug_rl", n, [*GRPO, *fsdp], init=root / "debug"), root / "debug_rl")
    big_rl = run(cli("grpo", root / "big_rl", n, [*GRPO, no_mtp, *fsdp], init=root / "big"), root / "big_rl")
    figures = {
        "start_random": excess(big, debug, "start_rss", p_bytes),
        "start_random_hwm": excess(big, debug, "start_hwm", p_bytes),
        "start_hf": excess(hf, debug, "start_rss", p_bytes),
        "start_hf_hwm": excess(hf, debug, "start_hwm", p_bytes),
        "sft_peak": excess(big, debug, "peak", p_bytes),
        "grpo_peak": excess(big_rl, debug_rl, "peak", p_bytes),
    }
    t = cfg.train  # float32 on CPU: compute_bytes 4; any chip: only its memory would differ
    layout = Layout(1, n, 1, t.activation_checkpoint, t.global_batch // n)
    e = estimate(cfg.model_args(259), CHIPS["h100"], n, t.seq_len, t.global_batch, layout, Assumptions(compute_bytes=4))
    predicted = {k: getattr(e, k) for k in ("params", "grads", "optimizer", "buffers", "activations", "total")}
    result = {
        "parameters": params,
        "P_bytes": p_bytes,
        "nproc": n,
        "figures_in_P": figures,
        "raw_bytes": {"debug": debug, "big": big, "hf": hf, "debug_rl": debug_rl, "big_rl": big_rl},
        "plan_predicted_peak_bytes": predicted,
        "plan_predicted_in_P": {k: v / p_bytes for k, v in predicted.items()},
    }
    for name, per_rank in figures.items():
        values = list(per_rank.values())
        print(f"{name:18s} max {max(values):.3f} P  rank 0 {per_rank[0]:.3f} P  all {[round(v, 3) for v in values]}")
    measured_peak = max(big["peak"].values()) - max(debug["peak"].values())
    print(
        f"plan: predicted peak per rank {predicted['total'] / 1e9:.3f} GB ({predicted['total'] / p_bytes:.3f} P) vs "
        f"measured {measured_peak / 1e9:.3f} GB ({measured_peak / p_bytes:.3f} P) above the overhead"
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
