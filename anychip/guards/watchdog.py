"""The hang watchdog (standard library only). Two ways to run it:

- beside ``anychip train``'s agent, in the launcher process (``ChildWatcher``): it
  watches every worker the agent starts **from the moment it is spawned**, so a worker
  that freezes in its imports, device init, the rendezvous or a checkpoint load, before
  it ever wrote a heartbeat, is found within ``watchdog_startup_s`` + ``watchdog_grace_s``;
- as a small process beside one worker (``python -m anychip.guards.watchdog --heartbeat F
  --pid P ...``), started by the worker itself where no anychip launcher is around (plain
  torchrun, or training in the launcher's own process). It can only watch from the moment
  the worker gets to start it.

Either way it reads the worker's heartbeat file every ``poll`` seconds. When the worker
has not beaten within the deadline it promised (or, before its first beat, within the
start-up deadline), the watchdog asks for its Python stacks (SIGUSR1, written by
faulthandler; impossible when the worker is stopped or has not registered it yet),
records a ``hang_detected`` event and kills the worker with SIGKILL: the launcher's
restart path takes over (anychip's agent: that rank alone; torchrun: the node's workers)
and the job resumes from its newest snapshot or checkpoint.

A worker is identified by its pid *and* its start time (and signalled through a pidfd
where Linux has them), so a recycled pid is never mistaken for it; deadlines are on the
system-wide monotonic clock, immune to wall-clock jumps.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..events import append_event

WATCHED_BY_LAUNCHER = "ANYCHIP_WATCHED"  # set by anychip's launcher, which watches its workers itself
PULSE_S = 0.5  # a worker's interpreter touches its pulse file this often (heartbeat.py)
DONE = "done"  # the heartbeat's phase once the worker's run ended (heartbeat.py)


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc), None when unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


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


class Worker:
    """One watched process: pid, start time, and a pidfd to signal it without a pid race."""

    def __init__(self, pid: int, start: int | None = None):
        self.pid = pid
        self.start = start if start is not None else process_start(pid)
        self.seen = time.monotonic()
        self.fd = None
        if hasattr(os, "pidfd_open"):
            try:
                self.fd = os.pidfd_open(pid)
            except OSError:
                self.fd = None

    def state(self) -> str | None:
        """The process state (see process_state); None once it is gone or its pid is another's."""
        if self.start is not None and process_start(self.pid) not in (None, self.start):
            return None
        return process_state(self.pid)

    def signal(self, sig: int) -> None:
        if self.state() is None:  # also when the pidfd was opened on a recycled pid
            return
        try:
            if self.fd is not None:
                signal.pidfd_send_signal(self.fd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def owns(self, beat: dict | None) -> bool:
        """Whether ``beat`` was written by this process (pid and start time)."""
        if beat is None or beat.get("pid") != self.pid:
            return False
        return beat.get("start") is None or self.start is None or beat["start"] == self.start

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def overdue(beat: dict | None, worker: Worker, startup_s: float, grace_s: float) -> tuple[float, float] | None:
    """(silent seconds, deadline) when ``worker`` is past its deadline, else None. Before its
    first heartbeat a worker has ``startup_s + grace_s`` from when the watch began."""
    now = time.monotonic()
    if worker.owns(beat):
        if beat.get("timeout_s") is None:
            return None  # unwatched phase (the final export and evaluation)
        silent = now - beat["mono"] if "mono" in beat else time.time() - beat["time"]
        return (silent, beat["timeout_s"]) if silent > beat["timeout_s"] else None
    silent, deadline = now - worker.seen, startup_s + grace_s
    return (silent, deadline) if silent > deadline else None


def watch(heartbeat: Path, pid: int, run_dir: Path, rank: int, stacks: Path, poll: float = 0.25) -> bool:
    """Watch one worker until it exits (False) or has been killed for hanging (True)."""
    worker = Worker(pid)
    try:
        while True:
            state = worker.state()
            if state in (None, "Z", "X"):
                if stacks.is_file() and stacks.stat().st_size == 0:
                    stacks.unlink(missing_ok=True)  # a worker that died some other way: no stacks were taken
                return False
            beat = read_beat(heartbeat)
            late = overdue(beat, worker, float("inf"), 0.0) if worker.owns(beat) else None
            if late is not None:
                kill_hung(worker, state, beat, run_dir, rank, stacks, *late)
                return True
            time.sleep(poll)
    finally:
        worker.close()


def kill_hung(
    worker: Worker,
    state: str,
    beat: dict | None,
    run_dir: Path,
    rank: int | None,
    stacks: Path | None,
    silent: float,
    deadline: float,
) -> None:
    """Stacks where possible, a ``hang_detected`` event, SIGKILL."""
    dumped = False
    if state != "T" and stacks is not None and stacks.exists():  # a stopped process cannot run its handler
        size = stacks.stat().st_size if stacks.exists() else 0
        worker.signal(signal.SIGUSR1)
        end = time.monotonic() + 2.0
        while time.monotonic() < end and not dumped:
            time.sleep(0.05)
            dumped = stacks.exists() and stacks.stat().st_size > size
        time.sleep(0.1)  # let the dump finish
    step, phase = (beat["step"], beat["phase"]) if beat is not None else (None, "spawned, no heartbeat yet")
    append_event(
        run_dir,
        "hang_detected",
        rank=rank,
        pid=worker.pid,
        step=step,
        phase=phase,
        silent_s=silent,
        timeout_s=deadline,
        process_state=state,
        stacks=str(stacks) if dumped else None,
    )
    message = (
        f"anychip watchdog: rank {rank} (pid {worker.pid}) made no progress for {silent:.1f} s at step {step} "
        f"({phase}; deadline {deadline:.1f} s); stacks: {stacks if dumped else 'unavailable'}; killing it"
    )
    print(message, file=sys.stderr, flush=True)
    worker.signal(signal.SIGKILL)


class ChildWatcher:
    """A thread in the launcher that watches every worker the agent starts from the moment
    it appears. ``workers``: a callable giving {pid: rank} of the processes that hold a rank
    now (``Agent.workers``; its warm spares are not among them until they get one)."""

    def __init__(self, run_dir: Path, startup_s: float, grace_s: float, workers, poll: float = 0.25):
        self.run_dir, self.startup_s, self.grace_s, self.poll = run_dir, startup_s, grace_s, poll
        self.workers = workers
        self._ranks: dict[int, int | None] = {}
        self._settle_until = 0.0
        self._stop = threading.Event()
        self._workers: dict[tuple[int, int | None], Worker] = {}
        self.paused = False  # e.g. while the launcher stops its workers on purpose
        self._thread = threading.Thread(target=self._run, name="anychip-watchdog", daemon=True)

    def start(self) -> ChildWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for w in self._workers.values():
            w.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self._ranks = self.workers()
            live = {pid: process_start(pid) for pid in self._ranks}
            for key in list(self._workers):
                if key not in live.items():
                    self._workers.pop(key).close()
            for pid, start in live.items():
                if (pid, start) not in self._workers:
                    self._workers[(pid, start)] = Worker(pid, start)
            if not self.paused and time.monotonic() >= self._settle_until:
                late = [x for x in (self._check(w) for w in list(self._workers.values())) if x is not None]
                for x in self._victims(late):
                    self._kill(*x)

    def _check(self, w: Worker) -> tuple | None:
        """(worker, state, rank, beat, (silent, deadline)) when ``w`` is past its deadline."""
        state = w.state()
        if state in (None, "Z", "X"):
            return None
        rank = self._ranks.get(w.pid)
        beat = read_beat(self.run_dir / "heartbeat" / f"rank{rank}.json") if rank is not None else None
        late = overdue(beat, w, self.startup_s, self.grace_s)
        return None if late is None else (w, state, rank, beat if w.owns(beat) else None, late)

    def _victims(self, late: list[tuple]) -> list[tuple]:
        """Of several overdue ranks, those whose interpreter stopped (no pulse for 4 x PULSE_S)
        if any, else the one silent longest; the others are judged again after a settling
        second, by when the ones killed have released them (or not)."""
        if len(late) <= 1:
            return late
        now = time.time()

        def stopped(x: tuple) -> bool:
            try:
                pulse = (self.run_dir / "heartbeat" / f"rank{x[2]}.pulse").stat().st_mtime
            except OSError:
                return True
            return now - pulse > 4 * PULSE_S

        victims = [x for x in late if stopped(x)] or [max(late, key=lambda x: x[4][0])]
        self._settle_until = time.monotonic() + 1.0
        return victims

    def _kill(self, w: Worker, state: str, rank: int | None, beat: dict | None, late: tuple[float, float]) -> None:
        stacks = self.run_dir / "stacks" / f"rank{rank}-{w.pid}.txt"  # written from the worker's start
        kill_hung(w, state, beat, self.run_dir, rank, stacks, *late)
        self._workers.pop((w.pid, w.start), None)
        w.close()


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
