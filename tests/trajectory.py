"""The training trajectory of three reference runs, as exact numbers: the per-step losses
(every float of ``metrics.jsonl`` that the math produces, as its repr) and a SHA-256 of the
final weights. A change of the training core that is meant to keep the math must keep
these bit-identical on the CPU they were recorded on (``tests/test_trajectory.py``).

    python tests/trajectory.py record   # store this CPU's fingerprints in tests/trajectory.json
    python tests/trajectory.py show     # print them

The runs are the ``anychip`` command line itself:
    sft   anychip train --set train.steps=60 (the tiny preset; the final evaluation skipped)
    grpo  anychip grpo --init <the sft run> --set train.steps=24 (8 prompts x 8 completions a step)
    ddp   anychip train with 2 processes (DDP), the recompute audit every other step
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

RECORDS = Path(__file__).with_name("trajectory.json")
# metrics the math produces (timings, memory and MFU are left out: they are measurements)
TIMED = {
    "step",
    "time",
    "step_time",
    "tokens_per_s",
    "mfu",
    "memory_peak_gb",
    "rollout_time",
    "snapshot_s",
    "snapshot_wait_s",
}
QUIET = ["--set", "log.tensorboard=false", "--set", "log.progress=false", "--set", "eval.n=0"]
# a loaded machine may stall a 0.1 s step for seconds: the hang watchdog (no part of the math) must not kill it
QUIET += ["--set", "guards.watchdog_grace_s=60"]
RUNS = {
    "sft": ["train", "--set", "train.steps=60"],
    "grpo": [
        "grpo",
        "--set",
        "train.steps=24",
        "--set",
        "checkpoint.interval=12",
        "--set",
        "grpo.prompts_per_step=8",  # x group_size 8: 64 completions a step (the demo samples 128)
        "--set",
        "grpo.max_new_tokens=64",
    ],
    "ddp": [
        "train",
        "--nproc",
        "2",
        "--set",
        "parallel.strategy=ddp",
        "--set",
        "train.steps=6",
        "--set",
        "guards.audit_interval=2",
        "--set",
        "checkpoint.interval=3",
        "--set",
        "train.micro_batch=4",
    ],
}


def cpu_key() -> str:
    """What bit-exact CPU results depend on: the CPU model, its vector extensions, torch and threads."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def fingerprint(run_dir: Path) -> dict:
    """Per-step losses and the final weights' digest of a finished run."""
    steps, audited = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "audit_max_rel_diff" in m:  # a guard's figure, not the math's
            audited.append((m["step"], m.pop("audit_max_rel_diff")))
        steps.append({k: repr(v) for k, v in sorted(m.items()) if k not in TIMED and not k.startswith("straggler")})
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].contiguous()
        digest.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"steps": steps, "weights": digest.hexdigest(), "audited": audited}


def run(name: str, root: Path, init: Path | None = None, timeout: float = 900) -> dict:
    """Run reference run ``name`` under ``root`` and return its fingerprint."""
    run_dir = root / name
    args = [sys.executable, "-m", "anychip.cli", *RUNS[name], *QUIET, "--run-dir", str(run_dir)]
    if name == "grpo":
        args += ["--init", str(init)]
    # the records were made with two threads per process (torch's default on the 2-core machine);
    # `anychip train`'s launcher now gives each of N workers cores / N threads when unset
    env = {**os.environ, "ANYCHIP_DEVICE": "cpu", "OMP_NUM_THREADS": "2"}
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return fingerprint(run_dir)


def record_all(root: Path) -> dict:
    sft = run("sft", root)
    return {"sft": sft, "grpo": run("grpo", root, init=root / "sft"), "ddp": run("ddp", root)}


if __name__ == "__main__":
    import tempfile

    what = sys.argv[1] if len(sys.argv) > 1 else "show"
    if what == "record":
        with tempfile.TemporaryDirectory() as tmp:
            result = record_all(Path(tmp))
        records = json.loads(RECORDS.read_text()) if RECORDS.exists() else {}
        records[cpu_key()] = {name: {k: v for k, v in run.items() if k != "audited"} for name, run in result.items()}
        RECORDS.write_text(json.dumps(records, indent=1) + "\n")
        print(f"recorded for {cpu_key()} in {RECORDS}")
    else:
        print(cpu_key())
        print(json.dumps(json.loads(RECORDS.read_text()).get(cpu_key()), indent=1)[:3000])
