"""The worker entry point: one rank of a training job.

    torchrun --nnodes 4 --nproc-per-node 8 ... -m anychip.launch my.toml [--set k=v ...] [--run-dir DIR]

``anychip train --nproc N`` starts N of these through torch's elastic launcher.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from .config import load_config
from .errors import UNRECOVERABLE, ConfigError
from .launcher_env import GENERATION, LAUNCHER_PID, PREEMPTED
from .rundir import RunLock, new_default_run_dir
from .runfiles import open_file, remove_file, write_file

FATAL = "fatal.json"  # written by a worker that stopped for a reason a restart cannot fix


def default_run_dir() -> Path:
    """runs/<torchelastic run id> under a launcher (the same on every rank and node),
    else a new, unique runs/<date-time>."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return Path("runs") / run_id
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("several processes need one run directory: pass --run-dir (or torchrun --rdzv-id)")
    return new_default_run_dir()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the process that started it (the elastic agent
    in ``anychip train`` or torchrun) dies, however it dies: the agent starts workers in a
    session of their own, where no signal to the launcher reaches them. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher and os.getppid() != int(launcher):
        os._exit(1)  # the launcher died before the line above: nobody is waiting for this worker


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent()
    p = argparse.ArgumentParser(prog="python -m anychip.launch", description="one rank of an anychip job")
    p.add_argument("config", nargs="?", help="TOML file (default: the embedded default)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--spare", action="store_true", help=argparse.SUPPRESS)  # a warm spare of anychip's agent
    a = p.parse_args(argv)
    if a.spare:
        from .agent import wait_for_rank

        if not wait_for_rank(a.config, a.sets):
            return 0  # the job ended without needing this one
    try:
        run_dir = a.run_dir or default_run_dir()
    except ConfigError as e:
        print(f"anychip: {e}", file=sys.stderr)
        return 2
    if os.environ.get(PREEMPTED):
        return 0  # started by a restart racing the preemption: the newest checkpoint stands
    fatal = run_dir / FATAL
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt and fatal.is_file():  # before any set-up: a refused restart costs only the interpreter start
        # an earlier attempt stopped for a reason that a restart cannot fix: do not retry it
        print(f"anychip: not retried: {json.loads(fatal.read_text())['error']}", file=sys.stderr)
        return 2
    lock = None
    if not os.environ.get(LAUNCHER_PID) and int(os.environ.get("RANK", "0")) == 0:
        try:  # plain torchrun: rank 0 holds the run directory for the job
            lock = RunLock(run_dir).acquire()
        except ConfigError as e:  # RunLocked, or runfiles.UnsafePath: a link where the run writes
            print(f"anychip: {e}", file=sys.stderr)  # another job's directory: write nothing there
            return 2
    stacks = early_stacks(run_dir)
    try:
        return _run(a, run_dir, fatal, attempt)
    finally:
        if lock is not None:
            lock.release()
        if stacks is not None and stacks.is_file() and stacks.stat().st_size == 0:
            stacks.unlink(missing_ok=True)


def early_stacks(run_dir: Path) -> Path | None:
    """Under anychip's launcher, which watches this worker from its spawn: let SIGUSR1 write
    the Python stacks to ``stacks/rank<r>-<pid>.txt`` from now on (before the device, the
    process group, the model and the data are set up), so that a worker frozen in start-up
    leaves its stacks too."""
    from .guards.watchdog import WATCHED_BY_LAUNCHER

    if not os.environ.get(WATCHED_BY_LAUNCHER):
        return None
    import faulthandler
    import signal

    path = run_dir / "stacks" / f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.txt"
    try:  # kept open for the life of the process, like faulthandler's; following no link (runfiles)
        f = open_file(run_dir, path.relative_to(run_dir))
    except (OSError, ConfigError):
        return None
    faulthandler.register(signal.SIGUSR1, file=f, all_threads=True, chain=False)
    return path


def _run(a: argparse.Namespace, run_dir: Path, fatal: Path, attempt: int) -> int:
    """Train; after a fault that left this process healthy (an exception, a peer's failure
    seen as a failed collective), train again in this same process: a new process group,
    the state from the newest snapshot (``parallel.restart_in_process``, at most
    ``parallel.max_restarts`` times). Errors a restart cannot fix are not retried."""
    from .train.loop import train

    try:
        if attempt == 0 and int(os.environ.get("RANK", "0")) == 0:
            remove_file(run_dir, FATAL)  # a new launch tries again
        cfg = load_config(a.config, a.sets)
        generation, failed_at = int(os.environ.get(GENERATION, "0")), None  # > 0: started alone to join peers
        while True:
            try:
                train(cfg, run_dir, generation=generation, failed_at=failed_at)
                return 0
            except UNRECOVERABLE:
                raise
            except Exception as e:
                p = cfg.parallel
                if not (p.restart_in_process and generation < p.max_restarts):
                    raise
                failed_at = getattr(e, "failed_at", time.monotonic())
                error = f"{type(e).__name__}: {e}"
            # out of the handler: the failed start's frames, its model and its process group are released
            generation += 1
            rank = os.environ.get("RANK", "0")
            print(f"anychip: rank {rank}: {error.splitlines()[0][:200]}; restarting in this process", file=sys.stderr)
    except UNRECOVERABLE as e:
        print(f"anychip: {e}", file=sys.stderr)  # a clear message, not a traceback
        if a.run_dir or os.environ.get("TORCHELASTIC_RUN_ID"):
            with contextlib.suppress(OSError, ConfigError):  # ConfigError: runfiles.UnsafePath, a link there
                run_dir.mkdir(parents=True, exist_ok=True)
                write_file(run_dir, FATAL, json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
