"""Checkpoints and recovery: SIGKILL anywhere -> bit-identical resume; corrupt files are
detected and skipped; N -> M processes; incompatible configs refused; failing writes
do not stop training; the elastic agent restarts a killed worker."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV, DEBUG_RUN
from safetensors.torch import load_file

from anychip.checkpoint import committed, verify
from anychip.config import load_config
from anychip.goodput import goodput
from anychip.train.loop import train
from anychip.train.runlog import read_jsonl as lines

RUN = [
    *DEBUG_RUN,
    "train.steps=16",
    "train.global_batch=4",
    "checkpoint.interval=4",
    "checkpoint.keep=3",
    "parallel.max_restarts=0",
]
ENV = CLI_ENV


def worker(run_dir: Path, *sets: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "anychip.launch", "--run-dir", str(run_dir)]
    for s in (*RUN, *sets):
        args += ["--set", s]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p: subprocess.Popen) -> None:
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    finish(worker(run))
    return run


def kill_when(p: subprocess.Popen, run: Path, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if condition(lines(run / "events.jsonl"), lines(run / "metrics.jsonl")):
            p.send_signal(signal.SIGKILL)
            p.wait()
            return
        time.sleep(0.001)
    raise AssertionError(f"condition not met before the worker ended (rc {p.poll()})")


def test_sigkill_at_random_steps_resumes_bit_identical(reference, tmp_path):
    rng = random.Random(1234)
    for k in sorted(rng.sample(range(1, 16), 3)):
        run = tmp_path / f"kill_at_{k}"
        p = worker(run)
        # at step k, once the step-0 checkpoint (written in the background) is committed
        kill_when(p, run, lambda ev, m, k=k: len(m) >= k and any(e["event"] == "checkpoint_commit" for e in ev))
        finish(worker(run))  # the same command again: it resumes
        assert_identical(weights(run), weights(reference))
        loads = [e for e in lines(run / "events.jsonl") if e["event"] == "checkpoint_load"]
        assert len(loads) == 1, k  # a guarded run saves step 0 at start: there is always one


def test_sigkill_during_a_checkpoint_write_resumes_bit_identical(reference, tmp_path):
    run = tmp_path / "kill_in_save"

    def saving(events, _):
        if not events or events[-1]["event"] != "checkpoint_save":
            return False
        step = events[-1]["step"]
        return step >= 8 and not any(e["event"] == "checkpoint_commit" and e["step"] == step for e in events)

    p = worker(run)
    kill_when(p, run, saving)
    killed_step = [e for e in lines(run / "events.jsonl") if e["event"] == "checkpoint_save"][-1]["step"]
    assert not any(e["event"] == "checkpoint_commit" and e["step"] == killed_step for e in lines(run / "events.jsonl"))
    for d in committed(run / "checkpoints"):
        assert verify(d) is None  # what was committed before is intact
    finish(worker(run))
    assert_identical(weights(run), weights(reference))
    events = lines(run / "events.jsonl")
    assert any(e["event"] == "checkpoint_load" and e["step"] < killed_step for e in events)
    crash = [e for e in events if e["event"] == "crash_detected"]
    assert len(crash) == 1 and crash[0]["last_step"] >= killed_step
    g = goodput(run)
    assert g.recomputed_steps > 0 and g.restarts == 1
    parts = g.productive_s + g.recomputed_s + g.checkpoint_stall_s + g.snapshot_stall_s + g.restart_s
    assert g.inprocess_restart_s == 0 and parts == pytest.approx(g.wall_s)


def test_elastic_agent_restarts_a_killed_worker(reference, tmp_path):
    run = tmp_path / "elastic"
    args = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run)]
    for s in (*RUN, "parallel.max_restarts=2"):
        args += ["--set", s]
    p = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(lines(run / "metrics.jsonl")) < 10 and time.time() < deadline:
        time.sleep(0.01)
    pid = [e for e in lines(run / "events.jsonl") if e["event"] == "run_start"][-1]["pid"]
    os.kill(pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    events = lines(run / "events.jsonl")
    assert any(e["event"] == "restart" and e["count"] == 1 for e in events)
    assert_identical(weights(run), weights(reference))


def _copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


def test_corrupt_checkpoints_fall_back_to_an_older_one(reference, tmp_path):
    run = _copy_run(reference, tmp_path / "corrupt")
    newest, second, third = committed(run / "checkpoints")[:3]
    f = next(newest.glob("*.distcp"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
    g = next(second.glob("*.distcp"))
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit
    g.write_bytes(bytes(data))
    state = train(load_config(run / "config.toml", ["train.steps=20"]), run)
    events = lines(run / "events.jsonl")
    corrupt = [e for e in events if e["event"] == "checkpoint_corrupt"]
    assert [Path(e["path"]).name for e in corrupt] == [newest.name, second.name]
    assert "truncated" in corrupt[0]["problem"] and f.name in corrupt[0]["problem"]
    assert "checksum" in corrupt[1]["problem"] and g.name in corrupt[1]["problem"]
    load = [e for e in events if e["event"] == "checkpoint_load"][-1]
    assert load["path"] == str(third) and state.step == 20


def test_incompatible_config_is_refused(reference, tmp_path):
    run = _copy_run(reference, tmp_path / "wider")
    argv = [sys.executable, "-m", "anychip.cli", "train", "--resume", str(run)]
    argv += ["--set", "model.hidden_size=48", "--set", "parallel.max_restarts=0", "--set", "train.steps=20"]
    r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "model.hidden_size (run: not set, now: 48)" in r.stderr and "Traceback" not in r.stderr
    # a worker started on the directory directly (plain torchrun) meets the checkpoint's own check
    p = worker(run, "model.hidden_size=48", "train.steps=20")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2, out
    assert "hidden_size: checkpoint 32 vs config 48" in out and "Traceback" not in out


def test_failing_writes_keep_earlier_checkpoints_and_training_goes_on(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    real, calls = dcp.async_save, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # the saves of steps 0 and 4 work, the later ones fail
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp, "async_save", flaky)
    state = train(load_config(None, RUN), tmp_path / "full")
    assert state.step == 16
    events = lines(tmp_path / "full" / "events.jsonl")
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert [e["step"] for e in failed] == [8, 12, 16] and "No space left" in failed[0]["error"]
    kept = committed(tmp_path / "full" / "checkpoints")
    assert [d.name for d in kept] == ["step_00000004", "step_00000000"] and verify(kept[0]) is None
    assert not [p for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("first, second", [(2, 1)])  # 1 -> 2: tests/test_expert_parallel.py (one -> ep2)
def test_resume_on_another_number_of_processes(tmp_path, first, second):
    def cli(run, n):
        args = [sys.executable, "-m", "anychip.cli", "train", "--nproc", str(n), "--run-dir", str(run)]
        for s in (*RUN, "parallel.strategy=fsdp"):
            args += ["--set", s]
        return subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight, switched = tmp_path / "straight", tmp_path / "switched"
    finish(cli(straight, first))
    p = cli(switched, first)  # preempted (SIGTERM) once step 8 is committed, then resumed on `second` processes
    deadline = time.time() + 120
    while not any(e["event"] == "checkpoint_commit" and e["step"] == 8 for e in lines(switched / "events.jsonl")):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.005)
    p.terminate()
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    stopped = [e for e in lines(switched / "events.jsonl") if e["event"] == "preempted"][-1]["step"]
    assert 8 <= stopped < 16
    resume = [sys.executable, "-m", "anychip.cli", "train", "--resume", str(switched), "--nproc", str(second)]
    finish(subprocess.Popen(resume, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    load = [e for e in lines(switched / "events.jsonl") if e["event"] == "checkpoint_load"][-1]
    assert load["step"] == stopped and load["saved_world_size"] == first
    ref = {m["step"]: m["loss"] for m in lines(straight / "metrics.jsonl")}
    got = {m["step"]: m["loss"] for m in lines(switched / "metrics.jsonl")}  # the resumed steps count
    assert sorted(got) == list(range(1, 17))
    # same weights, optimizer state and data position, resharded: the same run up to float tolerance
    after = range(stopped + 1, 17)
    assert [got[s] for s in after] == pytest.approx([ref[s] for s in after], rel=1e-4)


def test_resume_command_and_export_then_init_from_hf(reference, tmp_path):
    run = _copy_run(reference, tmp_path / "more")
    argv = [sys.executable, "-m", "anychip.cli", "train", "--resume", str(run)]
    argv += ["--set", "train.steps=20", "--set", "parallel.max_restarts=0"]
    r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [m["step"] for m in lines(run / "metrics.jsonl")][-4:] == [17, 18, 19, 20]
    r = subprocess.run(
        [sys.executable, "-m", "anychip.cli", "export", str(run), "--step", "16", "--out", str(tmp_path / "hf")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert_identical(exported, weights(reference))  # step 16 of the resumed run is the reference's end
    from anychip.train.hooks import Hooks

    seen = {}
    hooks = Hooks()
    hooks.add("on_start", lambda s: seen.update({k: v.clone() for k, v in s.model.state_dict().items()}))
    cfg = load_config(None, [*RUN, f"model.init_from=hf:{tmp_path / 'hf'}", "train.steps=1", "checkpoint.interval=0"])
    train(cfg, tmp_path / "from_hf", hooks)
    from anychip.models import load_hf

    for k, v in load_hf(tmp_path / "hf").state_dict().items():
        assert torch.equal(seen[k], v), k
    argv = [sys.executable, "-m", "anychip.cli", "export", str(run), "--step", "3", "--out", str(tmp_path / "x")]
    r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 2 and "no checkpoint of step 3" in r.stderr


def test_synchronous_saves_commit_before_returning(reference, tmp_path):
    state = train(load_config(None, [*RUN, "checkpoint.async_save=false"]), tmp_path / "sync")
    events = lines(tmp_path / "sync" / "events.jsonl")
    kinds = [e["event"] for e in events if e["event"].startswith("checkpoint_")]
    # each commit is logged before its save returns (the save event carries the whole stall)
    assert kinds[:4] == ["checkpoint_commit", "checkpoint_save", "checkpoint_commit", "checkpoint_save"]
    assert all(verify(d) is None for d in committed(tmp_path / "sync" / "checkpoints"))
    assert state.step == 16
    assert_identical(weights(tmp_path / "sync"), weights(reference))  # saving never changes training


def test_resume_below_the_checkpoint_step_is_refused(reference, tmp_path):
    from anychip.errors import ConfigError

    run = _copy_run(reference, tmp_path / "fewer")
    before = (run / "config.toml").read_text()
    with pytest.raises(ConfigError, match="train.steps = 10 is below the step of the checkpoint to resume, 16"):
        train(load_config(run / "config.toml", ["train.steps=10"]), run)
    assert (run / "config.toml").read_text() == before  # the refused config did not replace the run's


def test_a_checkpoint_altered_at_rest_is_found_at_the_next_commit(tmp_path):
    """A restart from a snapshot reads no checkpoint, so corruption at rest is looked for after
    each commit: one byte of the checkpoint of step 4, altered during step 5, is found when the
    checkpoint of step 8 commits, and set aside; training goes on."""
    from anychip.train.hooks import Hooks

    def alter(state):
        if state.step == 5:
            state.checkpointer.wait()
            target = max(
                (p for p in state.checkpointer.step_dir(4).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
            )
            with open(target, "r+b") as f:
                f.seek(target.stat().st_size // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))

    hooks = Hooks()
    hooks.add("after_step", alter)
    run = tmp_path / "run"
    state = train(load_config(None, [*RUN, "train.steps=9"]), run, hooks)
    assert state.step == 9
    events = lines(run / "events.jsonl")
    [bad] = [e for e in events if e["event"] == "checkpoint_corrupt"]
    assert Path(bad["path"]).name == "step_00000004" and "checksum" in bad["problem"]
    found = next(i for i, e in enumerate(events) if e is bad)
    commit8 = next(i for i, e in enumerate(events) if e["event"] == "checkpoint_commit" and e["step"] == 8)
    assert found > commit8
    assert (run / "checkpoints" / "corrupt_step_00000004").is_dir()
    assert [d.name for d in committed(run / "checkpoints")] == ["step_00000009", "step_00000008", "step_00000000"]
