"""`anychip` command line: train, grpo, eval, export, goodput, report, status, qualify."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import uuid
from pathlib import Path

from .config import DEFAULT_CONFIG, GRPO_CONFIG, load_config
from .errors import UNRECOVERABLE, ConfigError
from .launch import FATAL
from .launcher_env import LAUNCHER_PID, POOL, PREEMPTED
from .pools.launch import CONFIG as POOLS_CONFIG
from .pools.launch import LIGHTHOUSE_ENV
from .rundir import RunLock, check_new_run, new_default_run_dir, resume_changes
from .runfiles import remove_file, write_file


def _train(a: argparse.Namespace) -> int:
    sets = list(a.sets)
    embedded = DEFAULT_CONFIG
    if a.command == "grpo":
        embedded = GRPO_CONFIG
        sets.insert(0, "train.mode=grpo")
        if a.init is not None:
            sets.insert(1, f"model.init_from={json.dumps(str(a.init))}")
    if a.nproc is not None:
        sets.append(f"parallel.nproc={a.nproc}")
    if getattr(a, "pools", None) is not None:
        sets.append(f"pools.count={a.pools}")
    if getattr(a, "pool", None) is not None:  # one pool of a run whose pools start apart (a cluster)
        os.environ[POOL] = str(a.pool)
    if getattr(a, "lighthouse", None):
        os.environ[LIGHTHOUSE_ENV] = a.lighthouse
    faults = [spec for spec in a.chaos if not spec.startswith("every=")]  # shorthand: kind@step[:rank],...
    sets += [f"chaos.{spec}" for spec in a.chaos if spec.startswith("every=")]  # ... or every=N
    if faults:
        sets.append(f"chaos.at={','.join(faults)}")
    config = a.config
    if a.resume is not None:  # continue a stopped run: its own config, plus the changes a resume may make
        if a.config or a.run_dir:
            raise ConfigError("anychip train --resume RUN_DIR takes no CONFIG and no --run-dir")
        config = a.resume / "config.toml"
        if (a.resume / POOLS_CONFIG).is_file():  # a run of several pools (anychip train --pools K)
            config = a.resume / POOLS_CONFIG
        if not config.is_file():
            raise FileNotFoundError(f"--resume {a.resume}: no config.toml there (not a run directory)")
    cfg = load_config(config, sets, embedded=embedded)
    if a.resume is not None:  # against the config the checkpoint to resume was saved with, not the editable file
        from .checkpoint import saved_config
        from .pools.launch import pool_dir

        roots = [a.resume / "checkpoints", pool_dir(a.resume, 0) / "checkpoints"]
        saved = next((c for c in map(saved_config, roots) if c is not None), None)
        against = f"the config of its checkpoint, {saved}" if saved else f"{config} (no checkpoint yet: step 0 again)"
        changed = resume_changes(load_config(saved or config, check_inputs=False).to_dict(), cfg.to_dict())
        if changed:
            raise ConfigError(
                f"--resume {a.resume}: a resume may change steps, lr, batch, world size, device, guards, "
                f"checkpoints, evaluation and logging only; these differ from {against}: {'; '.join(changed)}. "
                "Start a new run (--init to start from this one's model) instead"
            )
        if saved is None:
            print(f"anychip: --resume {a.resume}: no checkpoint yet; compared with {config}", file=sys.stderr)
    if a.print_config:
        print(cfg.to_toml(), end="")
        return 0
    run_dir = Path(a.resume or a.run_dir or new_default_run_dir())
    with RunLock(run_dir):  # before anything in the directory is touched; released however this ends
        if a.resume is None:
            check_new_run(run_dir)
        from .snapshot import SnapshotJob

        snapshots = SnapshotJob(run_dir).start()  # the job's id, passed to its workers; dead jobs' removed
        try:
            if cfg.pools.count > 1 and POOL not in os.environ:  # this machine runs every pool
                from .pools.launch import run_pools

                return run_pools(cfg, run_dir, resume=a.resume is not None)
            if cfg.parallel.nproc == 1 and cfg.parallel.max_restarts == 0:
                from .train.loop import train

                state = train(cfg, run_dir)
                return 0 if state.step == cfg.train.steps or state.preempted else 1
            return launch_workers(cfg, run_dir)
        finally:
            snapshots.end()  # they serve restarts within this job only


def launch_workers(cfg, run_dir: Path) -> int:
    """Start ``parallel.nproc`` local workers (``python -m anychip.launch`` on the resolved
    config) under anychip's agent (``anychip.agent``): a dead worker is started again alone
    from a warm spare while its peers restart in their processes, or every worker is
    started again when that cannot be done, up to ``parallel.max_restarts`` restarts; the
    workers resume from the newest snapshot or good checkpoint in ``run_dir``.

    The caller holds the run directory's lock. Workers die with this process (parent-death
    signal); the hang watchdog watches each from the moment it is spawned; SIGTERM or
    SIGINT here is a preemption: the workers checkpoint at the next step boundary and exit,
    and this returns 0 (SIGKILL after ``parallel.preempt_grace_s``); SIGHUP or SIGQUIT stops
    the workers."""
    from .agent import Agent
    from .guards.watchdog import WATCHED_BY_LAUNCHER, ChildWatcher

    fatal = run_dir / FATAL
    remove_file(run_dir, FATAL)  # a new launch (e.g. --resume after a fix) tries again
    # the workers write config.toml once it fits the checkpoint
    config_file = write_file(run_dir, "launch.toml", cfg.to_toml())
    p = cfg.parallel
    # what torchrun does, sized to the machine: N workers that each start one OpenMP thread per
    # core oversubscribe the cores; measured on 2 cores with 2 workers, steps took 1.7x as long,
    # and up to 10x as long after a restart. A value the user set is kept.
    threads_set = "OMP_NUM_THREADS" not in os.environ
    if threads_set:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // p.nproc))
    g = cfg.guards
    if g.watchdog:
        os.environ[WATCHED_BY_LAUNCHER] = "1"
    os.environ[LAUNCHER_PID] = str(os.getpid())
    args = [str(config_file), "--run-dir", str(run_dir)]
    agent = Agent(args, run_dir, p.nproc, p.max_restarts, p.spare_workers, log=_say)
    watcher = None
    if g.watchdog:
        watcher = agent.watcher = ChildWatcher(run_dir, g.watchdog_startup_s, g.watchdog_grace_s, agent.workers)
        watcher.start()
    preemption = _Preemption(p.preempt_grace_s, agent.workers)
    stops = {
        s: signal.signal(s, lambda signum, _: agent.request_stop(signal.Signals(signum).name))
        for s in (signal.SIGHUP, signal.SIGQUIT)
    }
    try:
        outcome = agent.run(fatal)
    finally:
        preemption.close()
        for s, previous in stops.items():
            signal.signal(s, previous)
        if watcher is not None:
            watcher.stop()
        for key in (LAUNCHER_PID, WATCHED_BY_LAUNCHER, PREEMPTED, *(["OMP_NUM_THREADS"] if threads_set else [])):
            os.environ.pop(key, None)
    if outcome == "fatal":
        print(f"anychip: {json.loads(fatal.read_text())['error']}", file=sys.stderr)
        return 2
    if outcome != "done" and preemption.signal is not None:
        print(
            f"anychip: {preemption.signal}: the workers did not checkpoint within parallel.preempt_grace_s = "
            f"{p.preempt_grace_s:g} s and were killed",
            file=sys.stderr,
        )
        return 1
    if outcome == "stopped":
        print(f"anychip: stopped by {agent.stop_reason}", file=sys.stderr)
        return 1
    if outcome == "failed":
        print(f"anychip: workers failed after {p.max_restarts} restarts", file=sys.stderr)
        return 1
    if preemption.signal is not None:
        print(
            f"anychip: preempted ({preemption.signal}); continue with: anychip train --resume {run_dir}",
            file=sys.stderr,
        )
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Preemption:
    """The launcher's side of a preemption: SIGTERM/SIGINT become the workers' preemption
    signal; after the grace period (or a second signal) the workers are killed."""

    def __init__(self, grace_s: float, workers):
        from .train.preempt import PREEMPT_SIGNAL

        self.grace_s, self._workers, self._sig = grace_s, workers, PREEMPT_SIGNAL
        self.signal: str | None = None
        self._timer: threading.Timer | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: now
            self._kill()
            return
        self.signal = signal.Signals(signum).name
        os.environ[PREEMPTED] = self.signal  # a worker (re)started from now on stops at once
        print(
            f"anychip: {self.signal}: stopping at the next step boundary with a checkpoint "
            f"(at most {self.grace_s:g} s; send it again to stop now)",
            file=sys.stderr,
            flush=True,
        )
        for pid in self._workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, self._sig)
        self._timer = threading.Timer(self.grace_s, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        # the agent's handler of SIGHUP stops it (no restart) and takes the workers down
        os.kill(os.getpid(), signal.SIGHUP)
        for pid in self._workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _eval(a: argparse.Namespace) -> int:
    import torch

    from .data import ReasoningTasks, load_tokenizer
    from .device import get_device
    from .eval import evaluate
    from .models import load_hf

    path = Path(a.path)
    tokenizer_spec, tasks, seed, options = a.tokenizer, a.task, 0, {}
    if (path / "config.toml").is_file():  # a run directory: its own held-out split
        cfg = load_config(path / "config.toml", check_inputs=False)  # no corpus needed; no reward module imported
        tokenizer_spec = tokenizer_spec or cfg.data.tokenizer
        if not tasks or tasks == cfg.data.tasks:
            tasks, options = cfg.data.tasks, cfg.data.task_options
        seed = cfg.train.seed
        heldout_size = cfg.data.heldout_size
        max_new_tokens = a.max_new_tokens or cfg.eval.max_new_tokens
        if a.n > heldout_size:
            raise ConfigError(
                f"anychip eval: --n {a.n} exceeds the run's held-out set (data.heldout_size = {heldout_size}); "
                "problems beyond it may have been trained on"
            )
        path = path / "final"
    else:  # a bare model directory: the held-out split of seed 0 (anychip's default training seed)
        heldout_size = a.n
        max_new_tokens = a.max_new_tokens or 96
    if not tasks:
        raise ConfigError("anychip eval: name the task with --task (no run config to take it from)")
    device = get_device(None if a.device in (None, "auto") else a.device)
    model = load_hf(path, device=device.torch_device())
    tokenizer = load_tokenizer(tokenizer_spec or "byte")
    heldout = ReasoningTasks(tasks, seed=seed, split="heldout", heldout_size=heldout_size, task_kwargs=options)
    examples = [heldout.example(i) for i in range(a.n)]
    with torch.no_grad():
        result = evaluate(
            model, tokenizer, examples, max_new_tokens, a.batch_size, a.samples, a.temperature, a.top_p, a.seed
        )
    decoding = "greedy" if a.temperature <= 0 else f"pass@1 of {a.samples} samples at temperature {a.temperature:g}"
    report = {
        "accuracy": result.accuracy,
        "exact_accuracy": result.exact_accuracy,
        "correct": result.correct,
        "n": result.n,
        "tasks": tasks,
        "decoding": decoding,
        "model": str(path),
        "samples": result.samples,
    }
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"held-out accuracy on {','.join(tasks)} ({decoding}): {result.accuracy:.1%} "
            f"({result.correct:g}/{result.n}; exactly right: {result.exact_accuracy:.1%})"
        )
    return 0


def _export(a: argparse.Namespace) -> int:
    from .export import export

    path = export(a.run_dir, a.out, a.step, overwrite=a.overwrite)
    print(f"wrote {path}")
    return 0


def _lighthouse(a: argparse.Namespace) -> int:
    from .pools.launch import serve_lighthouse

    return serve_lighthouse(a.port, a.min_pools, a.timeout_s)


def _goodput(a: argparse.Namespace) -> int:
    from .goodput import format_goodput, goodput
    from .pools.timeline import format_timeline, pool_dirs, timeline
    from .runread import printable

    if pool_dirs(a.run_dir):  # a run of pools: its timeline, then each pool's split
        t = timeline(a.run_dir)
        if a.json:
            goodputs = {p: g.__dict__ | {"goodput": g.ratio} for p, g in t.goodputs.items()}
            print(json.dumps(t.as_dict() | {"pool_goodput": goodputs}))
            return 0
        print(format_timeline(t))
        for pool, g in t.goodputs.items():
            print(f"\n{printable(pool)}:\n{format_goodput(g)}")
        return 0
    g = goodput(a.run_dir)
    print(json.dumps(g.__dict__ | {"goodput": g.ratio}) if a.json else format_goodput(g))
    return 0


def _report(a: argparse.Namespace) -> int:
    from .report.page import write_report

    path = write_report(a.run_dir, a.out)
    print(f"wrote {path}")
    return 0


def _status(a: argparse.Namespace) -> int:
    from .pools.timeline import pool_dirs
    from .report.run import STATUS_METRICS, load_run
    from .report.status import print_status
    from .runread import printable

    pools = pool_dirs(a.run_dir)
    for pool in pools or [a.run_dir]:  # a run of pools: each pool's summary
        if pools and not a.json:
            print(f"{printable(pool.name)}:")
        print_status(load_run(pool, metric_keys=STATUS_METRICS), as_json=a.json)
    return 0


def _plan(a: argparse.Namespace) -> int:
    from .plan.command import run

    return run(a)


def _qualify(a: argparse.Namespace) -> int:
    from .qualify.options import check_arguments, default_out, worker_argv
    from .qualify.run import qualify

    try:
        check_arguments(a)
    except ValueError as e:
        raise ConfigError(f"anychip qualify: {e}") from None
    a.out = a.out or default_out(a.device)
    if a.nproc > 1:
        code = _launch_qualify(a.nproc, worker_argv(a))
    else:
        code = 1 if qualify(a)["status"] == "fail" else 0
    report = a.out / "qualify.json"
    if not report.is_file():
        print(f"anychip qualify: no report was written (exit {code})", file=sys.stderr)
        return code or 1
    status = json.loads(report.read_text())["status"]
    print(f"qualify: {status.upper()}; report card: {a.out / 'qualify.md'}, {a.out / 'qualify.html'}")
    return 1 if status == "fail" else 0


def _launch_qualify(nproc: int, argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.2,
    )
    try:
        elastic_launch(launch, entrypoint=sys.executable)("-m", "anychip.qualify.run", *argv)
    except ChildFailedError:
        return 1  # a failed check exits 1 on every rank; the report says which
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anychip", description="vendor-neutral, fault-tolerant LLM training")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (default: tiny DeepSeek-V3 on reasoning-gym arithmetic)")
    r = sub.add_parser(
        "grpo", help="reinforcement learning with verifiable rewards (GRPO, Dr. GRPO, DAPO, GSPO) from a trained model"
    )
    for q, default in ((t, DEFAULT_CONFIG), (r, GRPO_CONFIG)):
        q.add_argument("config", nargs="?", help=f"TOML file (default: the embedded {default})")
        q.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
        q.add_argument("--nproc", type=int, help="local worker processes (parallel.nproc)")
        q.add_argument("--run-dir", type=Path, help="output directory (default runs/<date-time>)")
        q.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        q.add_argument(
            "--chaos",
            action="append",
            default=[],
            metavar="SPEC",
            help="inject faults: kind@step[:rank],... or every=N (see [chaos] in the config)",
        )
        q.add_argument(
            "--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run from its newest checkpoint"
        )
        q.set_defaults(fn=_train)
    t.add_argument("--pools", type=int, metavar="K", help="K pools on this machine, with a lighthouse (pools.count)")
    t.add_argument("--pool", type=int, metavar="I", help="this job is pool I of a run whose pools start apart")
    t.add_argument("--lighthouse", metavar="URL", help="the pools' lighthouse (default $TORCHFT_LIGHTHOUSE)")
    lh = sub.add_parser("lighthouse", help="serve the quorum of a run's pools (torchft's lighthouse)")
    lh.add_argument("--port", type=int, default=29510)
    lh.add_argument("--min-pools", type=int, default=1, help="the fewest pools that may train")
    lh.add_argument("--timeout-s", type=float, default=5.0, help="a pool silent this long leaves the quorum")
    lh.set_defaults(fn=_lighthouse)
    r.add_argument(
        "--init",
        type=Path,
        metavar="PATH",
        help="the model to start from: an anychip run, one of its checkpoints, or a Hugging Face directory "
        "(model.init_from)",
    )
    e = sub.add_parser("eval", help="held-out accuracy of a run (RUN_DIR) or a Hugging Face directory")
    e.add_argument("path", help="run directory or Hugging Face model directory")
    e.add_argument("--task", action="append", default=[], help="reasoning-gym task (default: the run's)")
    e.add_argument("--n", type=int, default=200, help="problems to score")
    e.add_argument("--tokenizer", default="", help="byte or tokenizer.json (default: the run's, else byte)")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens, else 96")
    e.add_argument("--batch-size", type=int, default=50)
    e.add_argument("--samples", type=int, default=1, help="sampled completions per problem (with --temperature)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--device", default=None, help="device type (default: auto)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(fn=_eval)
    x = sub.add_parser("export", help="a run's checkpoint as a Hugging Face directory")
    x.add_argument("run_dir", type=Path)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=_export)
    g = sub.add_parser("goodput", help="wall time split into productive, lost, checkpoint and restart time")
    g.add_argument("run_dir", type=Path)
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=_goodput)
    rp = sub.add_parser("report", help="one self-contained HTML page of a run: loss, speed, experts, faults, goodput")
    rp.add_argument("run_dir", type=Path)
    rp.add_argument("--out", type=Path, help="the HTML file (default RUN_DIR/report.html)")
    rp.set_defaults(fn=_report)
    st = sub.add_parser("status", help="a run's summary in the terminal (also while it runs)")
    st.add_argument("run_dir", type=Path)
    st.add_argument("--json", action="store_true", help="print the summary as JSON")
    st.set_defaults(fn=_status)
    pl = sub.add_parser("plan", help="will a model fit on a fleet of chips, in which layout, and how fast")
    from .plan.command import add_arguments as plan_arguments

    plan_arguments(pl)
    pl.set_defaults(fn=_plan)
    q = sub.add_parser("qualify", help="where a device computes differently from a reference, and where it is slow")
    from .qualify.options import add_arguments

    add_arguments(q)
    q.set_defaults(fn=_qualify)
    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (*UNRECOVERABLE, FileExistsError) as err:
        print(f"anychip: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
