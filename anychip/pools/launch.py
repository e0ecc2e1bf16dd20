"""`anychip train --pools K`: a run of K pools on this machine, and `anychip lighthouse`.

    RUN_DIR/pools.toml     the run's config (pools.count = K)
    RUN_DIR/events.jsonl   this launcher's record: pool_started, pool_exited, run_end
    RUN_DIR/pool<i>/       pool i: an ordinary run directory (its own checkpoints, events, metrics)

Each pool is `anychip train` on pools.toml with $ANYCHIP_POOL = i and the lighthouse this
launcher serves in $TORCHFT_LIGHTHOUSE: its own processes and agent. A pool whose job ends in
failure (every process of it dead: a lost fleet) is started again from its run directory
(`--resume`), up to pools.max_restarts times, and takes the current state from a live pool;
the others go on meanwhile. On a cluster the same run is a lighthouse on one host
(`anychip lighthouse`) and each pool under its own `torchrun` on its own hosts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..events import append_event, read_jsonl
from ..launcher_env import LAUNCHER_PID, POOL, POOL_ATTEMPT

CONFIG = "pools.toml"
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"


def lighthouse(port: int, min_pools: int, timeout_s: float):
    """torchft's lighthouse (the quorum of the pools), serving on ``port`` (0: any free port).
    A pool silent for ``timeout_s`` leaves the quorum."""
    os.environ.setdefault("RUST_LOG", "warn")  # it logs every quorum at info
    from torchft.coordination import LighthouseServer

    return LighthouseServer(
        bind=f"[::]:{port}", min_replicas=min_pools, join_timeout_ms=1000, heartbeat_timeout_ms=int(timeout_s * 1000)
    )


def pool_dir(run_dir: Path, index: int) -> Path:
    return run_dir / f"pool{index}"


def run_pools(cfg, run_dir: Path, resume: bool) -> int:
    """Run the K pools of ``cfg`` under ``run_dir`` (the caller holds its lock); returns 0 when
    every pool finished, 2 for an input error (fatal in a pool), 1 otherwise."""
    p = cfg.pools
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / CONFIG
    if not resume:
        config.write_text(cfg.to_toml())
    server = lighthouse(0, 1, p.timeout_s)
    address = server.address()
    env = {k: v for k, v in os.environ.items() if k != LAUNCHER_PID}
    env[LIGHTHOUSE_ENV] = address
    if "OMP_NUM_THREADS" not in env:  # every pool's processes share this machine's cores (a value set is kept)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // (p.count * cfg.parallel.nproc)))
    print(f"anychip: {p.count} pools, lighthouse at {address} -> {run_dir}", file=sys.stderr, flush=True)
    pools = [_Pool(i, run_dir, config, env) for i in range(p.count)]
    stopping = []

    def stop(signum, _frame):  # a preemption of the run: of every pool
        stopping.append(signal.Signals(signum).name)
        for pool in pools:
            pool.signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for pool in pools:
            pool.start()
        status = _watch(pools, p.max_restarts, stopping, 4 * p.timeout_s, cfg.train.steps)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for pool in pools:
            pool.kill()
        server.shutdown()
    append_event(run_dir, "run_end", status=status, pools=p.count)
    return {"done": 0, "fatal": 2}.get(status, 0 if status == "preempted" else 1)


def _watch(pools: list[_Pool], max_restarts: int, stopping: list, linger_s: float, steps: int) -> str:
    """Restart pools that fail until one pool finishes the run. Then a pool still short of the last
    step (one coming back, which would train alone to the end) is preempted at once: it stops with
    a checkpoint; the others (in step with it, finishing too) get ``linger_s``, then are preempted."""
    finished_at = None
    while True:
        running = False
        if finished_at is not None and time.monotonic() > finished_at + linger_s and not stopping:
            stopping.append("finished")
            for pool in pools:
                pool.signal(signal.SIGTERM)
        for pool in pools:
            code = pool.poll()
            if code is None:
                running = running or pool.proc is not None
                continue
            pool.exited(code)
            if code == 0:
                if finished_at is None:
                    finished_at = time.monotonic()
                    for other in pools:
                        if other.last_step() < steps:
                            other.signal(signal.SIGTERM)
                continue
            if code == 2:  # an input error: no restart repeats it
                for other in pools:
                    other.kill()
                return "fatal"
            if stopping or finished_at is not None:
                continue
            if pool.restarts >= max_restarts:
                for other in pools:
                    other.kill()
                return "failed"
            pool.restarts += 1
            pool.start()
            running = True
        if not running:
            if finished_at is not None:
                return "done"  # the run's last step is in at least one pool's final model
            if stopping:
                return "preempted"
            return "failed"
        time.sleep(0.05)


class _Pool:
    """One pool's job: `anychip train` in a session of its own, its output lines prefixed."""

    def __init__(self, index: int, run_dir: Path, config: Path, env: dict):
        self.index, self.run_dir, self.config = index, run_dir, config
        self.dir = pool_dir(run_dir, index)
        self.env = {**env, POOL: str(index)}
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.code: int | None = None

    def start(self) -> None:
        resume = (self.dir / "config.toml").is_file()
        args = ["--resume", str(self.dir)] if resume else [str(self.config), "--run-dir", str(self.dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anychip.cli", "train", *args],
            env={**self.env, POOL_ATTEMPT: str(self.restarts)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a pool dies as a whole
            preexec_fn=_die_with_parent,
        )
        self.code = None
        threading.Thread(target=self._echo, args=(self.proc,), daemon=True).start()
        append_event(
            self.run_dir,
            "pool_started",
            pool=f"pool{self.index}",
            pid=self.proc.pid,
            attempt=self.restarts,
            resume=resume,
        )

    def _echo(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            sys.stderr.write(f"[pool{self.index}] {line.decode(errors='replace')}")
        sys.stderr.flush()

    def last_step(self) -> int:
        """The newest step in the pool's metrics (0 before any)."""
        records = read_jsonl(self.dir / "metrics.jsonl")
        return records[-1]["step"] if records else 0

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def exited(self, code: int) -> None:
        self.code, self.proc = code, None
        append_event(self.run_dir, "pool_exited", pool=f"pool{self.index}", code=code)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


def serve_lighthouse(port: int, min_pools: int, timeout_s: float) -> int:
    """`anychip lighthouse`: serve the quorum of a cluster's pools until SIGTERM/SIGINT."""
    server = lighthouse(port, min_pools, timeout_s)
    print(f"anychip lighthouse at {server.address()} (export {LIGHTHOUSE_ENV}={server.address()})", flush=True)
    done = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: done.set())
    done.wait()
    server.shutdown()
    return 0
