"""The worker's side of the hang watchdog.

Each rank writes ``RUN_DIR/heartbeat/rank<r>.json`` (step, phase, time on the wall and
on the monotonic clock, its pid and start time, and the deadline it promises to beat
again within). Under ``anychip train``'s launcher the launcher watches it (from the
moment the worker is spawned, ``ChildWatcher``); elsewhere the worker starts
``python -m anychip.guards.watchdog`` beside itself. A watchdog thread inside the worker
would not do: a worker stuck in a native call that holds the GIL, or stopped, cannot run it. Deadlines: inside training,
``watchdog_factor`` x the median step time + ``watchdog_grace_s``; around start-up,
checkpoint steps, held-out loss steps and rollbacks, ``watchdog_startup_s``; the final
export and evaluation are not watched (their length depends on the evaluation set, not on
the step time).

Beside the heartbeat, a thread touches ``rank<r>.pulse`` every half second: it stops when the
interpreter stops (a native call that holds the GIL, a stopped process), not when the main
thread waits in a collective. When several ranks are overdue at once, the watchdog kills those
whose pulse stopped first: the ranks waiting for them are then released by their death.

On SIGUSR1 the worker's Python stacks are written to ``RUN_DIR/stacks/rank<r>-<pid>.txt``
by faulthandler, which works while another thread holds the GIL.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ..runfiles import open_file, write_file
from .watchdog import DONE, PULSE_S, WATCHED_BY_LAUNCHER, process_start


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int, guards_cfg, long_step: Callable[[int], bool]):
        self.cfg = guards_cfg
        self.long_step = long_step  # steps that end with a checkpoint or a held-out loss
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "heartbeat" / f"rank{rank}.json"
        stacks = self.run_dir / "stacks" / f"rank{rank}-{os.getpid()}.txt"
        self._stacks_path = stacks
        self._stacks = open_file(self.run_dir, stacks.relative_to(self.run_dir))  # following no link (runfiles)
        faulthandler.register(signal.SIGUSR1, file=self._stacks, all_threads=True, chain=False)
        self.step_times: deque[float] = deque(maxlen=50)
        self._last = None
        self._start = process_start(os.getpid())
        self.beat(0, "start-up", self.cfg.watchdog_startup_s)
        self._pulse_stop = threading.Event()
        self._pulse = threading.Thread(target=self._pulse_loop, name="anychip-pulse", daemon=True)
        self._pulse.start()
        self.process = None
        if os.environ.get(WATCHED_BY_LAUNCHER):
            return
        argv = [sys.executable, "-m", "anychip.guards.watchdog", "--heartbeat", str(self.path)]
        argv += ["--pid", str(os.getpid()), "--run-dir", str(run_dir), "--rank", str(rank), "--stacks", str(stacks)]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def _pulse_loop(self) -> None:
        path = self.path.with_suffix(".pulse")
        while not self._pulse_stop.is_set():
            with contextlib.suppress(OSError):
                path.touch()
            self._pulse_stop.wait(PULSE_S)

    def done(self) -> None:
        """The run ended here (phase "done", no deadline): anychip's agent does not start this
        process again for a failure in its teardown."""
        self.beat(-1, DONE, None)

    def unwatched(self, phase: str) -> None:
        """From here on, no deadline (e.g. the final export and evaluation, of any length)."""
        self.beat(-1, phase, None)

    def beat(self, step: int, phase: str, timeout_s: float | None) -> None:
        record = {
            "step": step,
            "phase": phase,
            "time": time.time(),
            "mono": time.monotonic(),
            "timeout_s": timeout_s,
            "pid": os.getpid(),
            "start": self._start,
        }
        # a new temporary, renamed over the beat, following no link (runfiles); not fsynced: a beat
        # matters only while this machine is up
        write_file(self.run_dir, self.path.relative_to(self.run_dir), json.dumps(record), durable=False)

    def _step_timeout(self, next_step: int) -> float:
        # no step timing yet, a save or a held-out loss (the finish is unwatched)
        if len(self.step_times) < 3 or self.long_step(next_step):
            return self.cfg.watchdog_startup_s
        return self.cfg.watchdog_factor * statistics.median(self.step_times) + self.cfg.watchdog_grace_s

    # -- hooks -----------------------------------------------------------------------

    def before_update(self, state) -> None:
        self.beat(state.step, "step", self._step_timeout(state.step))

    def before_rollback(self, state) -> None:
        self.beat(state.step, "rollback", self.cfg.watchdog_startup_s)  # a checkpoint load

    def after_step(self, state) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now
        self.beat(state.step, "step", self._step_timeout(state.step + 1))

    def after_rollback(self, state) -> None:
        self._last = None
        self.beat(state.step, "rollback", self._step_timeout(state.step + 1))

    def close(self) -> None:
        self._pulse_stop.set()
        self._pulse.join(timeout=2)  # no thread of this run left running into the interpreter's exit
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        faulthandler.unregister(signal.SIGUSR1)
        name = self._stacks_path
        self._stacks.close()
        if os.path.getsize(name) == 0:
            os.remove(name)
