"""Peak resident memory of `anychip export` of a run of the `debug` preset and of a run of a
401M-parameter model (v2-lite shapes cut down: hidden 1024, 10 layers, 16 routed experts of
512, vocabulary 16384, no MTP), each export a fresh process; the figure is the difference,
over the bigger model's float32 bytes P.

Each run is made once by a one-step `anychip train` (one process, CPU, a checkpoint per
step) in --work, and reused when it is already there. Each export runs from this checkout;
--baseline REV also from a detached worktree of REV (e.g. the commit before export streamed,
0e864f6), removed at the end, so that both are measured side by side, and the bench says
whether the two wrote the same bytes. The peak is the export's ru_maxrss (getrusage
RUSAGE_CHILDREN of a process that starts only the export).

    python bench/export_memory.py [--work DIR] [--baseline REV] [--repeats 1]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from sharded_memory import BIG  # noqa: E402 (the model of both benches)

COMMON = [
    "train.steps=1",
    "train.global_batch=1",
    "train.seq_len=16",
    "train.warmup_steps=0",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "device.type=cpu",
    "checkpoint.interval=1",
    "checkpoint.async_save=false",
    "parallel.max_restarts=0",
]
MODELS = {
    "debug": ["model.preset=debug"],
    "401M": BIG,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def make_run(run: Path, sets: list[str]) -> None:
    if (run / "checkpoints").is_dir():
        return
    cmd = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run)]
    for s in (*sets, *COMMON):
        cmd += ["--set", s]
    subprocess.run(cmd, env={**ENV, "PYTHONPATH": str(ROOT)}, cwd=ROOT, check=True, capture_output=True)


def model_bytes(run: Path) -> int:
    """Bytes of the run's model in float32 (its parameter count x 4), from its checkpoint."""
    sys.path.insert(0, str(ROOT))
    from anychip.export import checkpoint_args, checkpoint_tensors, newest_verified

    directory = newest_verified(run / "checkpoints")
    tensors = checkpoint_tensors(directory, checkpoint_args(directory)[0])
    return sum(4 * shape.numel() for _, shape, _ in tensors)


def peak_rss(code: Path, run: Path, out: Path) -> int:
    """Bytes: peak resident set of one `anychip export RUN --out OUT` run from checkout ``code``."""
    shutil.rmtree(out, ignore_errors=True)
    export = ["-c", "import sys; from anychip.cli import main; sys.exit(main())", "export", str(run), "--out", str(out)]
    # a process of its own, whose only child is the export: RUSAGE_CHILDREN is that child's peak
    probe = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**ENV, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-c", probe, sys.executable, *export]
    r = subprocess.run(cmd, env=env, cwd=code, check=True, capture_output=True)  # cwd: first on sys.path
    return int(r.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, help="where the runs and exports go (default: a temporary directory)")
    p.add_argument("--baseline", help="also measure the export of this git revision (a worktree of it)")
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="export_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    codes = {"this checkout": ROOT}
    if a.baseline:
        tree = work / f"code-{a.baseline}"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), a.baseline], check=True)
        codes = {f"baseline {a.baseline}": tree, **codes}
    try:
        measure(work, codes, a.repeats)
    finally:
        if a.baseline:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    if a.work is None:
        print(f"(runs and exports left in {work})")


def measure(work: Path, codes: dict[str, Path], repeats: int) -> None:
    """Make the runs if need be, export each from each checkout and print the figures."""
    runs = {name: work / f"run-{name}" for name in MODELS}
    for name, sets in MODELS.items():
        make_run(runs[name], sets)
    big = model_bytes(runs["401M"])
    results = {}
    for label, code in codes.items():
        peaks = {}
        for name, run in runs.items():
            out = work / f"export-{label.replace(' ', '_')}-{name}"
            peaks[name] = min(peak_rss(code, run, out) for _ in range(repeats))
        extra = peaks["401M"] - peaks["debug"]
        results[label] = {
            "peak_debug_MB": peaks["debug"] / 1e6,
            "peak_401M_MB": peaks["401M"] / 1e6,
            "over_P": extra / big,
        }
        print(
            f"{label}: peak {peaks['debug'] / 1e6:.0f} MB (debug), {peaks['401M'] / 1e6:.0f} MB (401M); "
            f"difference {extra / 1e6:.0f} MB = {extra / big:.2f} P (P = {big / 1e6:.0f} MB)"
        )
    if len(codes) > 1:
        labels = [label.replace(" ", "_") for label in codes]
        for name in runs:
            same = same_files(*(work / f"export-{label}-{name}" for label in labels))
            print(f"{name}: the two exports' files are {'byte-identical' if same else 'DIFFERENT'}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
