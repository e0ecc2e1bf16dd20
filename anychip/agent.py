"""The local agent of ``anychip train --nproc N``: starts the workers of this machine,
hosts the job's store, and when a worker dies starts that rank again, alone.

torch's elastic agent (torchrun's) stops and restarts every worker of the node when one of
them dies. Here the dead worker's peers stay in their processes: their collectives fail
within milliseconds (``abort_world``), they re-enter training in place
(``anychip.launch``, ``parallel.restart_in_process``) and wait in the rendezvous of the next
generation for the one new process, which joins that generation and restores the same
snapshot they do. The new process is taken from a warm spare (``parallel.spare_workers``):
an interpreter started in advance with torch and anychip imported, idle at the lowest CPU
priority (SCHED_IDLE) until it is given a rank; so a replacement costs no interpreter start
and no imports.

Every worker is started again, as a new attempt of the job (what torch's agent does on any
failure), when a rank cannot be replaced alone: it died before its process group formed
(its peers may not be waiting for it), a peer already finished, or the job has one process.

Multi-node jobs run under torchrun and torch's agent, where a dead worker restarts its node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from .events import append_event
from .launcher_env import ATTEMPT, GENERATION, LAUNCHER_PID, PREEMPTED

WORKER = ["-m", "anychip.launch"]


class Agent:
    """Runs ``python -m anychip.launch ARGS`` as ranks 0..nproc-1 until every one exits 0,
    restarting failed ones at most ``max_restarts`` times in all (``run``)."""

    def __init__(self, args: list[str], run_dir: Path, nproc: int, max_restarts: int, spares: int, log=print):
        from torch.distributed import TCPStore

        self.args, self.run_dir, self.nproc, self.max_restarts = args, run_dir, nproc, max_restarts
        self.n_spares, self.log = spares, log
        # the job's store: outlives every worker, so a new one finds its peers' generation
        self.store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.base_env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.store.port),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0",
            "GROUP_WORLD_SIZE": "1",
            "ROLE_NAME": "default",
            "ROLE_WORLD_SIZE": str(nproc),
            "TORCHELASTIC_RUN_ID": str(uuid.uuid4()),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
            LAUNCHER_PID: str(os.getpid()),
        }
        self.attempt = 0  # starts of every worker
        self.restarts = 0  # restarts of one worker or of all, against max_restarts
        self.procs: dict[int, subprocess.Popen] = {}
        self.generation: dict[int, int] = {}  # the generation each rank's process was started to join
        self.finished: set[int] = set()
        self.spares: list[subprocess.Popen] = []
        self.stop_reason: str | None = None
        self.watcher = None  # a ChildWatcher, paused while this agent stops workers on purpose
        self._lock = threading.Lock()

    # -- for the watchdog and the preemption handler (other threads) ---------------------

    def workers(self) -> dict[int, int]:
        """{pid: rank} of the rank processes alive now (spares not included)."""
        with self._lock:
            return {p.pid: r for r, p in self.procs.items() if p.poll() is None}

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason

    # -- the loop ------------------------------------------------------------------------

    def run(self, fatal: Path, poll_s: float = 0.05) -> str:
        """ "done" (every rank exited 0), "fatal" (``fatal`` written: a reason no restart can
        fix), "failed" (out of restarts) or "stopped" (``request_stop``)."""
        try:
            self._start_all()
            while True:
                if fatal.is_file():
                    return "fatal"
                if self.stop_reason is not None:
                    return "stopped"
                for rank, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or rank in self.finished:
                        continue
                    if code == 0 or self._done(rank):
                        self._finished(rank, code)
                    elif fatal.is_file():
                        return "fatal"
                    elif not self._restart(rank, code):
                        return "failed"
                    else:
                        break  # the processes changed: look again
                else:
                    if self.finished and self._waiting() and not self._restart_waiting():
                        return "failed"
                if len(self.finished) == self.nproc:
                    return "done"
                self._keep_spares()
                time.sleep(poll_s)
        finally:
            self._stop(list(self.procs.values()) + self.spares)

    def _restart(self, rank: int, code: int) -> bool:
        how = describe(code)
        if self.restarts >= self.max_restarts:
            self.log(f"anychip: rank {rank} failed ({how}); no restarts left (parallel.max_restarts)")
            return False
        self.restarts += 1
        joined = self._joined(rank)
        alone = self.nproc > 1 and not self.finished and joined is not None and joined >= self.generation[rank]
        if alone:
            spare = self._start(rank, joined + 1)
        else:
            self._restart_all()
            spare = None
        scope = "rank" if alone else "all"
        append_event(
            self.run_dir, "worker_restart", rank=rank, scope=scope, count=self.restarts, spare=spare, cause=how
        )
        what = f"rank {rank} again, alone" if alone else "every worker again"
        self.log(
            f"anychip: rank {rank} failed ({how}); starting {what} (restart {self.restarts} of {self.max_restarts})"
        )
        return True

    def _finished(self, rank: int, code: int) -> None:
        self.finished.add(rank)
        if code:  # after it recorded the end of its run: the result stands
            self.log(f"anychip: rank {rank} exited with {describe(code)} after finishing the run; not restarted")

    def _waiting(self) -> list[int]:
        """Ranks started alone that have not joined their peers' generation yet."""
        waiting = []
        for rank, proc in self.procs.items():
            joined = self._joined(rank)
            if rank not in self.finished and proc.poll() is None and (joined is None or joined < self.generation[rank]):
                waiting.append(rank)
        return [r for r in waiting if self.generation[r] > 0]

    def _restart_waiting(self) -> bool:
        """A peer finished the run while a rank started alone waits for it (the rank died after
        the run's last collective, e.g. in the final export): start every worker again, to
        resume from the newest checkpoint."""
        rank = self._waiting()[0]
        if self.restarts >= self.max_restarts:
            self.log(f"anychip: rank {rank} waits for peers that finished; no restarts left (parallel.max_restarts)")
            return False
        self.restarts += 1
        self._restart_all()
        append_event(
            self.run_dir,
            "worker_restart",
            rank=rank,
            scope="all",
            count=self.restarts,
            spare=False,
            cause="peers finished",
        )
        self.log(f"anychip: rank {rank} waits for peers that finished the run; starting every worker again")
        return True

    def _done(self, rank: int) -> bool:
        """Whether ``rank``'s process recorded the end of its run: its heartbeat's last phase,
        written by that very process (with ``guards.watchdog`` off there is none, and a crash
        in the teardown is restarted: the run resumes from its final checkpoint)."""
        from .guards.watchdog import DONE, read_beat

        beat = read_beat(self.run_dir / "heartbeat" / f"rank{rank}.json")
        pid = getattr(self.procs.get(rank), "pid", None)
        return beat is not None and beat.get("phase") == DONE and beat.get("pid") == pid

    def _joined(self, rank: int) -> int | None:
        from .parallel import joined_key

        key = joined_key(self.attempt, rank)
        return int(self.store.get(key)) if self.store.check([key]) else None

    def _start_all(self) -> None:
        for rank in range(self.nproc):
            self._start(rank, 0)

    def _restart_all(self) -> None:
        if self.watcher is not None:
            self.watcher.paused = True
        try:
            self._stop(list(self.procs.values()))
        finally:
            if self.watcher is not None:
                self.watcher.paused = False
        self.attempt += 1
        self.finished.clear()
        self._start_all()

    def _start(self, rank: int, generation: int) -> bool:
        """Start ``rank`` to join ``generation``: on a warm spare when one is ready (True), else
        in a new interpreter (False)."""
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "ROLE_RANK": str(rank),
            "TORCHELASTIC_RESTART_COUNT": str(self.restarts),
            ATTEMPT: str(self.attempt),
            GENERATION: str(generation),
        }
        if os.environ.get(PREEMPTED):
            env[PREEMPTED] = os.environ[PREEMPTED]
        proc = self._take_spare(env)
        on_spare = proc is not None
        if proc is None:
            proc = subprocess.Popen(
                [sys.executable, *WORKER, *self.args], env={**self.base_env, **env}, start_new_session=True
            )
        with self._lock:
            self.procs[rank] = proc
            self.generation[rank] = generation
        return on_spare

    # -- spares --------------------------------------------------------------------------

    def _keep_spares(self) -> None:
        self.spares = [s for s in self.spares if s.poll() is None]
        while len(self.spares) < self.n_spares and self.stop_reason is None:
            self.spares.append(
                subprocess.Popen(
                    [sys.executable, *WORKER, "--spare", *self.args],
                    env=self.base_env,
                    stdin=subprocess.PIPE,
                    start_new_session=True,
                )
            )

    def _take_spare(self, env: dict) -> subprocess.Popen | None:
        while self.spares:
            spare = self.spares.pop(0)
            normal_priority(spare.pid)  # from now on, also if its imports are not done yet
            try:
                spare.stdin.write((json.dumps(env) + "\n").encode())
                spare.stdin.close()
                return spare
            except (BrokenPipeError, OSError):
                continue  # it died; the next one, or a new interpreter
        return None

    def _stop(self, procs: list[subprocess.Popen]) -> None:
        """SIGKILL and reap: the state to resume from is in the snapshots and checkpoints."""
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)


def describe(code: int) -> str:
    """A process's return code in words: "signal SIGKILL", "exit code 1"."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def wait_for_rank(config: str | None, sets: list[str]) -> bool:
    """A spare's side (``python -m anychip.launch --spare``): import what training needs at
    the lowest CPU priority, then wait for the agent to give this process a rank (one JSON
    line of environment variables on stdin) and return True with the priority restored;
    False when the agent closed the pipe without one (the job ended)."""
    if hasattr(os, "sched_setscheduler"):
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    # the imports are the work a spare saves: torch's (dynamo: torch.nn.init's), anychip's, and
    # the config's (reasoning-gym and its plotting libraries: 1.4 s here; reward modules)
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    from .config import load_config
    from .train import loop  # noqa: F401

    with contextlib.suppress(Exception):  # its errors are the worker's to report, once it has a rank
        load_config(config, sets)

    line = sys.stdin.readline()
    if not line.strip():
        return False
    os.environ.update(json.loads(line))
    normal_priority(os.getpid())
    return True


def normal_priority(pid: int) -> None:
    """Every thread of ``pid`` back from SCHED_IDLE to the normal policy (which an unprivileged
    process may do for its own processes); nothing where Linux's scheduler calls are missing."""
    if not hasattr(os, "sched_setscheduler"):
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
