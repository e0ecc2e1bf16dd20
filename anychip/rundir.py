"""One run, one writer: the run directory's lock, unique default directories, and what a
new job may do with a directory that already holds a run. Standard library only.

The lock is an exclusive ``flock`` on ``RUN_DIR/.lock``, held by the process that owns
the job (``anychip train``'s launcher, or rank 0 under plain torchrun) for the job's
life; its own workers and their restarts are the same job and take no lock. The OS
drops the lock when the holder dies however it dies, so a lock left by a dead job is
no obstacle. ``flock`` is advisory and local-filesystem semantics: on NFS it depends on
the server (NFSv4 supports it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import ConfigError
from .runfiles import refuse_links

LOCK = ".lock"
# keys a resume may change: how long and how fast to train, on how many devices, how to
# guard, log, checkpoint and evaluate it. Anything else would make it another run.
RESUMABLE = (
    "train.steps",
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.global_batch",
    "train.micro_batch",
    "train.activation_checkpoint",
    "train.compile",
    "train.log_interval",
    "parallel.",
    "device.",
    "guards.",
    "log.",
    "chaos.",
    "checkpoint.",
    "eval.",
)


class RunLocked(ConfigError):
    """Another live job holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory (see the module docstring). ``acquire`` raises
    RunLocked naming the holder's pid and host when another live process holds it, and
    touches nothing else in the directory."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Also refuses (UnsafePath, naming it) a directory where a path anychip keeps is a symbolic
        link: the holder is about to write there."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        refuse_links(self.run_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"{self.run_dir} is in use by another job ({holder(self.run_dir)}); "
                "wait for it to end or choose another --run-dir"
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, harmless
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(run_dir: str | Path) -> str:
    """Who holds ``run_dir``'s lock, as the holder recorded it: "pid 123 on host-a since ..."."""
    try:
        r = json.loads((Path(run_dir) / LOCK).read_text())
        return f"pid {r['pid']} on {r['host']} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(r['since']))}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded itself"


def new_default_run_dir(root: str | Path = "runs") -> Path:
    """A run directory no other job has: ``runs/<date-time>`` (``-2``, ``-3``, ... when taken),
    created here, so that two jobs started in the same second never share one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{root}: no free run directory name for {stamp}")


# what a directory holds when it holds a run: a new run there would overwrite or mix with it
RUN_MARKS = ("config.toml", "events.jsonl", "final", "checkpoints")


def existing_run(run_dir: str | Path) -> str | None:
    """What ``run_dir`` already holds of a run (any of RUN_MARKS, a link too), None when nothing."""
    run_dir = Path(run_dir)
    held = []
    for name in RUN_MARKS:
        path = run_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        shown = f"{name}/" if path.is_dir() else name
        if name == "checkpoints" and path.is_dir() and not path.is_symlink():
            steps = sorted(
                int(p.name[5:]) for p in path.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit()
            )
            if steps:
                shown = f"{len(steps)} checkpoint(s), the newest of step {steps[-1]}"
        held.append(shown)
    return ", ".join(held) or None


def check_new_run(run_dir: str | Path) -> None:
    """Refuse to start a new run in a directory that holds a run (see RUN_MARKS), naming what it holds."""
    held = existing_run(run_dir)
    if held:
        raise ConfigError(
            f"{run_dir} already holds a run ({held}); continue it with `anychip train --resume {run_dir}` "
            "(or `anychip grpo --resume`), or choose another --run-dir"
        )


def resume_changes(saved: dict, now: dict) -> list[str]:
    """Keys (``section.key``) whose values differ between a run's saved config and the
    config of its resume, that a resume may not change (see RESUMABLE)."""
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    out = []
    for key in sorted(set(flat_saved) | set(flat_now)):
        if flat_saved.get(key) != flat_now.get(key) and not key.startswith(RESUMABLE):
            out.append(f"{key} (run: {_shown(flat_saved, key)}, now: {_shown(flat_now, key)})")
    return out


def _shown(flat: dict, key: str) -> str:
    return repr(flat[key]) if key in flat else "not set"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:  # sections; tables inside a section compare whole
            out.update(_flatten(v, f"{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
