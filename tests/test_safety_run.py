"""One run, one writer; workers die with their launcher; SIGTERM is a preemption; a worker
frozen before its first heartbeat is found; input errors are not retried; every number in
a config is finite. Each in the form a user would meet it."""

import json
import os
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import CLI_ENV, DEBUG_RUN
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from anychip.config import Config, load_config
from anychip.errors import ConfigError
from anychip.models import ModelArgs
from anychip.rundir import RunLock, RunLocked, new_default_run_dir
from anychip.train.loop import train
from anychip.train.runlog import read_jsonl as lines

RUN = [
    *DEBUG_RUN,
    "train.steps=16",
    "train.global_batch=4",
    "checkpoint.interval=4",
    "eval.interval=0",
]
ENV = CLI_ENV


def cli(*args: str, sets=RUN) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "anychip.cli", *args]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def done(p: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err


def wait_for(condition, p: subprocess.Popen | None = None, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        assert p is None or p.poll() is None, f"ended before {what}: {done(p)[1][-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def checkpoint_tensors(directory: Path, tmp: Path) -> dict:
    """Every tensor of a DCP checkpoint (model and optimizer), flattened."""
    out = tmp / f"{directory.name}-{time.monotonic_ns()}.pt"
    dcp_to_torch_save(directory, out)
    flat = {}

    def walk(prefix, x):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, torch.Tensor):
            flat[prefix] = x

    walk("", torch.load(out, weights_only=False))  # written by this test from our own checkpoint
    return flat


def assert_same_run(a: Path, b: Path, tmp: Path) -> None:
    ta = checkpoint_tensors(a / "checkpoints" / "step_00000016", tmp)
    tb = checkpoint_tensors(b / "checkpoints" / "step_00000016", tmp)
    assert ta.keys() == tb.keys() and len(ta) > 10
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    rc, out = done(cli("train", "--run-dir", str(run), sets=[*RUN, "parallel.max_restarts=0"]))
    assert rc == 0, out
    return run


# -- one run, one writer ---------------------------------------------------------------


def test_two_jobs_started_together_on_one_directory_one_runs_the_other_is_refused(tmp_path):
    run = tmp_path / "run"
    sets = [*RUN, "train.steps=40", "parallel.max_restarts=0"]
    a, b = cli("train", "--run-dir", str(run), sets=sets), cli("train", "--run-dir", str(run), sets=sets)
    results = sorted([done(a), done(b)])
    assert [rc for rc, _ in results] == [0, 2], results
    refused = results[1][1]
    assert "is in use by another job (pid " in refused and " on " in refused, refused
    assert "Traceback" not in refused
    assert len([e for e in lines(run / "events.jsonl") if e["event"] == "run_start"]) == 1
    # the directory now holds a finished run: a new job there is refused, --resume is the way
    rc, out = done(cli("train", "--run-dir", str(run), sets=sets))
    assert rc == 2 and f"{run} already holds a run" in out and "--resume" in out
    rc, out = done(cli("train", "--resume", str(run), sets=["train.seq_len=32", "train.seed=5", "train.steps=50"]))
    assert rc == 2 and "train.seq_len (run: 48, now: 32)" in out and "train.seed (run: 0, now: 5)" in out
    assert "train.steps" not in out  # a resume may train longer


def test_a_lock_left_by_a_dead_job_is_no_obstacle(tmp_path):
    run = tmp_path / "run"
    code = f"from anychip.rundir import RunLock; RunLock({str(run)!r}).acquire(); "
    code += "print('held', flush=True); import time; time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLocked, match=f"pid {holder.pid} on "):
        RunLock(run).acquire()
    holder.kill()
    holder.wait()
    with RunLock(run):  # the OS released the dead holder's lock
        pass


def test_default_run_directories_are_unique_within_one_second(tmp_path):
    dirs = {new_default_run_dir(tmp_path) for _ in range(5)}
    assert len(dirs) == 5 and all(d.is_dir() for d in dirs)


# -- workers die with their launcher; SIGTERM is a preemption ---------------------------


def run_processes(run: Path) -> list[int]:
    """Live processes whose command line names the run directory (workers, watchdogs)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run).encode() in cmd and state != "Z":
            found.append(int(pid))
    return found


@pytest.mark.parametrize("nproc, restarts", [(2, 3), (1, 0)], ids=["elastic-agent-2-workers", "in-process"])
def test_sigkill_of_the_launcher_leaves_no_process_of_the_run(tmp_path, nproc, restarts):
    run = tmp_path / "run"
    sets = [*RUN, "train.steps=2000", f"parallel.max_restarts={restarts}", "parallel.strategy=ddp"]
    p = cli("train", "--nproc", str(nproc), "--run-dir", str(run), sets=sets)
    wait_for(lambda: len(lines(run / "metrics.jsonl")) >= 2, p, what="two steps")
    assert len(run_processes(run)) >= 1 + (nproc if restarts else 1)  # launcher + workers (or watchdog)
    p.kill()
    p.wait()
    deadline = time.time() + 15
    while run_processes(run) and time.time() < deadline:
        time.sleep(0.2)
    assert run_processes(run) == []


def test_sigterm_at_a_random_step_checkpoints_exits_0_and_resumes_bit_identical(reference, tmp_path):
    run = tmp_path / "run"
    k = int(torch.randint(2, 8, ()).item())
    slow = ["chaos.at=slow@1", "chaos.slow_s=1.0", "chaos.slow_steps=16"]  # sleeps only: the run stays alive
    p = cli("train", "--nproc", "1", "--run-dir", str(run), sets=[*RUN, "parallel.max_restarts=2", *slow])
    wait_for(lambda: len(lines(run / "metrics.jsonl")) >= k, p, what=f"step {k}")
    # one writer: a resume while the job is alive is refused, naming the holder
    rc, out = done(cli("train", "--resume", str(run), sets=[]))
    assert rc == 2 and f"is in use by another job (pid {p.pid} on " in out, out
    assert p.poll() is None, "the run ended before the signal"
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, out = done(p, timeout=60)
    elapsed = time.monotonic() - t0
    assert rc == 0, out
    stop = [e for e in lines(run / "events.jsonl") if e["event"] == "preempted"]
    assert len(stop) == 1 and k <= stop[0]["step"] < 16 and elapsed < 30
    assert stop[0]["checkpoint"] == str(run / "checkpoints" / f"step_{stop[0]['step']:08d}")
    assert [e for e in lines(run / "events.jsonl") if e["event"] == "run_end"][-1]["status"] == "preempted"
    rc, out = done(cli("train", "--resume", str(run), sets=[]))
    assert rc == 0, out
    assert [e for e in lines(run / "events.jsonl") if e["event"] == "checkpoint_load"][-1]["step"] == stop[0]["step"]
    assert_same_run(run, reference, tmp_path)


# -- watching starts at spawn ------------------------------------------------------------


def test_a_worker_stopped_right_after_it_starts_is_found_and_the_run_finishes_bit_identical(reference, tmp_path):
    run = tmp_path / "run"
    sets = [*RUN, "parallel.max_restarts=1", "guards.watchdog_startup_s=20", "guards.watchdog_grace_s=1"]
    p = cli("train", "--nproc", "1", "--run-dir", str(run), sets=sets)
    workers = []

    def spawned():
        workers[:] = [pid for pid in run_processes(run) if pid != p.pid]
        return bool(workers)

    wait_for(spawned, p, what="the worker", timeout=60)
    os.kill(workers[0], signal.SIGSTOP)  # frozen before it could start any watchdog of its own
    rc, out = done(p)
    assert rc == 0, out
    hangs = [e for e in lines(run / "events.jsonl") if e["event"] == "hang_detected"]
    assert len(hangs) == 1 and hangs[0]["pid"] == workers[0] and hangs[0]["process_state"] == "T"
    assert hangs[0]["step"] is None and 20 <= hangs[0]["silent_s"] < 30
    assert_same_run(run, reference, tmp_path)


# -- deterministic errors are not retried ------------------------------------------------


def test_a_tokenizer_of_garbage_exits_2_in_one_attempt_naming_the_key(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not json")
    run = tmp_path / "run"
    rc, out = done(cli("train", "--nproc", "1", "--run-dir", str(run), sets=[*RUN, f"data.tokenizer={bad}"]))
    assert rc == 2, out
    assert f"data.tokenizer = '{bad}'" in out and "not a valid tokenizer.json" in out
    assert "not retried" not in out and "Traceback" not in out  # no restart was attempted
    assert "data.tokenizer" in json.loads((run / "fatal.json").read_text())["error"]


def test_an_empty_corpus_and_bad_task_options_are_config_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"data = 'jsonl corpus .*empty.jsonl'.*no records"):
        train(load_config(None, [*RUN, "data.source=jsonl", f"data.path={empty}"]), tmp_path / "a")
    sets = [*RUN, "data.task_options.basic_arithmetic={no_such_option=3}"]
    with pytest.raises(ConfigError, match=r"task_options.*no_such_option"):
        train(load_config(None, sets), tmp_path / "b")


# -- every number is finite -----------------------------------------------------------------


def numeric_keys() -> list[str]:
    keys = []
    for name, section in typing.get_type_hints(Config).items():
        keys += [f"{name}.{k}" for k, h in typing.get_type_hints(section).items() if h in (int, float)]
    hints = typing.get_type_hints(ModelArgs)
    keys += [f"model.{k}" for k, h in hints.items() if h in (float, int, float | None, int | None)]
    return keys


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_numeric_key_refuses_non_finite_values(value):
    keys = numeric_keys()
    assert {"guards.watchdog_factor", "guards.spike_threshold", "train.weight_decay", "model.rope_theta"} <= set(keys)
    for key in keys:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError, match="grpo.rewards.*finite"):
        load_config(None, [f"grpo.rewards={{accuracy = {value}}}"])


def test_init_from_with_a_shape_override_is_an_error_naming_the_key(tmp_path, debug_args):
    from conftest import make_model

    from anychip.models import save_hf

    save_hf(make_model(debug_args), tmp_path / "hf")
    init = f"model.init_from=hf:{tmp_path / 'hf'}"
    with pytest.raises(ConfigError, match=r"model\.hidden_size = 48 cannot be combined with model\.init_from.*is 32"):
        load_config(None, [*RUN, init, "model.hidden_size=48"])
    # the model's own value, and shape-free keys, are fine
    load_config(None, [*RUN, init, "model.hidden_size=32", "model.mtp_loss_weight=0.5"])


# -- a run from elsewhere ------------------------------------------------------------------


def test_a_copied_run_exports_evaluates_and_reports_without_its_inputs_and_runs_no_reward_module(tmp_path):
    from anychip.checkpoint import committed, write_manifest

    run = tmp_path / "run"
    train(load_config(None, [*RUN, "train.steps=4", "checkpoint.interval=4"]), run)
    evil = tmp_path / "evil"
    evil.mkdir()
    touched = tmp_path / "reward-module-was-imported"
    (evil / "shipped_reward.py").write_text(f"open({str(touched)!r}, 'w').close()\ndef f(**kw):\n    return [0.0]\n")
    # what a run from elsewhere looks like: a reward module we do not have, a corpus and an
    # init_from directory that are not here (and a manifest recomputed to match)
    for config in [run / "config.toml", committed(run / "checkpoints")[0] / "config.toml"]:
        text = config.read_text().replace('init_from = ""', f'init_from = "{tmp_path / "gone"}"')
        text = text.replace('path = ""', f'path = "{tmp_path / "gone.jsonl"}"')
        config.write_text(text.replace("[grpo.rewards]", '[grpo.rewards]\n"shipped_reward:f" = 1.0'))
    write_manifest(committed(run / "checkpoints")[0])
    assert "shipped_reward:f" in (run / "config.toml").read_text()
    env = {**ENV, "PYTHONPATH": f"{evil}{os.pathsep}{ENV.get('PYTHONPATH', '')}"}
    for args in (
        ["export", str(run), "--out", str(tmp_path / "hf")],
        ["eval", str(run), "--n", "2"],
        ["status", str(run)],
        ["report", str(run)],
    ):
        r = subprocess.run([sys.executable, "-m", "anychip.cli", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    assert not touched.exists()
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (run / "report.html").is_file()
    # training from it checks every input (and imports its reward modules: training runs them)
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(run / "config.toml")


def test_start_up_removes_leftovers_of_an_interrupted_final_save_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    for name in (".final.tmp-x1y2", ".final.old-4242", ".final-notes"):
        (run / name).mkdir(parents=True)
        (run / name / "model.safetensors").write_bytes(b"\0" * 64)
    train(load_config(None, [*RUN, "train.steps=1", "checkpoint.interval=0"]), run)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".final")) == [".final-notes"]
    cleaned = sorted(e["path"] for e in lines(run / "events.jsonl") if e["event"] == "final_save_cleanup")
    assert cleaned == [str(run / ".final.old-4242"), str(run / ".final.tmp-x1y2")]


def test_the_watchdog_knows_its_worker_by_pid_and_start_time_on_the_monotonic_clock():
    from anychip.guards.watchdog import Worker, overdue, process_start

    me = Worker(os.getpid())
    assert me.start == process_start(os.getpid()) and me.state() in ("R", "S")
    assert Worker(os.getpid(), start=me.start + 1).state() is None  # same pid, another process: not it
    beat = {"pid": os.getpid(), "start": me.start, "mono": time.monotonic() - 5, "time": 0.0, "timeout_s": 3.0}
    assert overdue(beat, me, 600, 5)[1] == 3.0  # its own beat: 5 s silent against 3 s (the wall clock is ignored)
    assert overdue({**beat, "timeout_s": 10.0}, me, 600, 5) is None
    assert overdue({**beat, "timeout_s": None}, me, 600, 5) is None  # an unwatched phase
    stranger = {**beat, "start": me.start + 1}  # a beat of an earlier process with the same pid
    assert overdue(stranger, me, 600, 5) is None  # not its beat: the start-up deadline (605 s) applies
    me.seen -= 700
    assert overdue(stranger, me, 600, 5)[1] == 605
    me.close()


def test_of_several_overdue_ranks_the_watchdog_kills_those_whose_interpreter_stopped(tmp_path):
    """Rank 1 hung holding the GIL (its pulse stopped), rank 0 waits for it in a collective (its
    pulse goes on): only rank 1 is chosen, and the others are judged again after a settling
    second. With every pulse going on, the rank silent longest is chosen."""
    from anychip.guards.watchdog import PULSE_S, ChildWatcher

    beats = tmp_path / "heartbeat"
    beats.mkdir()
    watcher = ChildWatcher(tmp_path, 600, 5, dict)
    for rank in (0, 1):
        (beats / f"rank{rank}.pulse").touch()
    stale = time.time() - 10 * PULSE_S
    os.utime(beats / "rank1.pulse", (stale, stale))
    late = [("w0", "S", 0, None, (6.1, 6.0)), ("w1", "S", 1, None, (6.0, 6.0))]
    assert [x[2] for x in watcher._victims(late)] == [1]
    assert watcher._settle_until > time.monotonic() + 0.5
    (beats / "rank1.pulse").touch()
    assert [x[2] for x in watcher._victims(late)] == [0]  # no stopped interpreter: the longest silence
    assert watcher._victims(late[1:]) == late[1:]  # one overdue rank: that one


def test_the_agent_sees_a_rank_that_recorded_the_end_of_its_run(tmp_path):
    """A worker that finished its run records it as its heartbeat's last phase: the agent
    then takes a crash in that worker's teardown for the end it already reached, and does
    not start it again; the record of another process (an earlier one of that rank) is not it."""
    from anychip.agent import Agent

    agent = Agent([], tmp_path, 2, 0, 0)
    agent.procs[0] = SimpleNamespace(pid=4242)
    assert not agent._done(0) and not agent._done(1)
    (tmp_path / "heartbeat").mkdir()
    (tmp_path / "heartbeat" / "rank0.json").write_text(json.dumps({"phase": "done", "pid": 4243}))
    assert not agent._done(0)
    (tmp_path / "heartbeat" / "rank0.json").write_text(json.dumps({"phase": "step", "pid": 4242}))
    assert not agent._done(0)
    (tmp_path / "heartbeat" / "rank0.json").write_text(json.dumps({"phase": "done", "pid": 4242}))
    assert agent._done(0) and not agent._done(1)
