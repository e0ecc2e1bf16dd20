"""The hang watchdog: a small process beside one worker (standard library only).

    python -m anychip.guards.watchdog --heartbeat F --pid P --run-dir D --rank R --stacks S

It reads the worker's heartbeat file every ``--poll`` seconds. When the worker has not
beaten within the deadline it promised, the watchdog asks for its Python stacks
(SIGUSR1, written by faulthandler; impossible when the worker is stopped), records a
``hang_detected`` event and kills the worker with SIGKILL: the launcher's restart path
(torch elastic) takes over and the job resumes from its newest checkpoint. The watchdog
exits when its worker is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from ..events import append_event


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (R, S, D, T, Z, ...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"  # alive, state unknown (no /proc)


def read_beat(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def watch(heartbeat: Path, pid: int, run_dir: Path, rank: int, stacks: Path, poll: float = 0.25) -> bool:
    """Watch until the worker exits (False) or has been killed for hanging (True)."""
    while True:
        state = process_state(pid)
        if state in (None, "Z", "X"):
            if stacks.is_file() and stacks.stat().st_size == 0:
                stacks.unlink(missing_ok=True)  # a worker that died some other way: no stacks were taken
            return False
        beat = read_beat(heartbeat)
        if beat is not None and beat.get("pid") == pid and beat.get("timeout_s") is not None:
            silent = time.time() - beat["time"]
            if silent > beat["timeout_s"]:
                _kill(beat, pid, state, run_dir, rank, stacks, silent)
                return True
        time.sleep(poll)


def _kill(beat: dict, pid: int, state: str, run_dir: Path, rank: int, stacks: Path, silent: float) -> None:
    dumped = False
    if state != "T":  # a stopped process cannot run its signal handler
        size = stacks.stat().st_size if stacks.exists() else 0
        os.kill(pid, signal.SIGUSR1)
        deadline = time.time() + 2.0
        while time.time() < deadline and not dumped:
            time.sleep(0.05)
            dumped = stacks.exists() and stacks.stat().st_size > size
        time.sleep(0.1)  # let the dump finish
    append_event(
        run_dir, "hang_detected", rank=rank, pid=pid, step=beat["step"], phase=beat["phase"], silent_s=silent,
        timeout_s=beat["timeout_s"], process_state=state, stacks=str(stacks) if dumped else None,
    )  # fmt: skip
    print(f"anychip watchdog: rank {rank} (pid {pid}) made no progress for {silent:.1f} s at step {beat['step']} "
          f"(deadline {beat['timeout_s']:.1f} s); stacks: {stacks if dumped else 'unavailable'}; killing it",
          file=sys.stderr, flush=True)  # fmt: skip
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m anychip.guards.watchdog")
    p.add_argument("--heartbeat", type=Path, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--stacks", type=Path, required=True)
    p.add_argument("--poll", type=float, default=0.25)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    watch(a.heartbeat, a.pid, a.run_dir, a.rank, a.stacks, a.poll)
    return 0


if __name__ == "__main__":
    sys.exit(main())
