"""Snapshots in shared memory and restarts within the process: a fault costs a step or two
of work, and the run still ends bit-identical to one that never failed."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV, DEBUG_RUN, run_command
from safetensors.torch import load_file

from anychip.config import load_config
from anychip.snapshot import run_root
from anychip.train.hooks import Hooks
from anychip.train.loop import train
from anychip.train.runlog import read_jsonl

RUN = [*DEBUG_RUN, "train.global_batch=4"]
ENV = CLI_ENV


def cli(run_dir: Path, *sets: str, timeout: float = 300):
    args = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run_dir)]
    for s in (*RUN, *sets):
        args += ["--set", s]
    r = run_command(args, ENV, timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == kind]


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def live_state(state) -> dict:
    """Copies of everything a snapshot must give back."""
    out = {f"model/{k}": v.clone() for k, v in state.model.state_dict().items()}
    names = {p: n for n, p in state.model.named_parameters()}
    for p, st in state.optimizer.state.items():
        out.update({f"optim/{names[p]}/{k}": v.clone() for k, v in st.items()})
    out.update({f"rng/{k}": v.clone() for k, v in state.device.rng_state().items()})
    return out


def test_snapshots_keep_two_copies_at_most_and_never_a_nonfinite_one(tmp_path):
    """Every step's snapshot leaves at most two slots on this rank; a snapshot holding a
    non-finite value is refused and the newest one kept stays; the memory is freed at the end."""
    cfg = load_config(None, [*RUN, "train.steps=7", "checkpoint.interval=0"])
    seen, checked, where = [], {}, []

    def after_step(state):
        snaps = state.checkpointer.snapshots
        where.append(snaps.dir)
        seen.append(sorted(p.name for p in snaps.dir.iterdir()))
        if state.step == 6:
            snaps.wait()
            checked["before"] = snaps.steps()
            p = next(iter(state.model.parameters()))
            saved = p.data.view(-1)[0].item()
            p.data.view(-1)[0] = math.nan
            snaps.background = False
            with pytest.raises(FloatingPointError, match="non-finite"):
                snaps.take(6)
            p.data.view(-1)[0] = saved
            checked["after"] = snaps.steps()

    hooks = Hooks()
    hooks.add("after_step", after_step)
    state = train(cfg, tmp_path / "run", hooks)
    assert state.step == 7
    assert checked == {"before": [5, 6], "after": [6]}  # the slot written into was given up, not the newest
    assert len(seen) == 7 and all(sum(f.endswith(".bin") for f in files) <= 2 for files in seen)
    assert all(sum(f.endswith(".json") for f in files) <= 2 for files in seen)
    assert set(where) == {run_root(tmp_path / "run") / "rank0"}
    assert not run_root(tmp_path / "run").exists(), "the run ended: its snapshot memory is freed"


def test_a_snapshot_gives_back_the_whole_state_bit_for_bit(tmp_path):
    """Restoring the snapshot of step 4 at step 5 gives back the model, the optimizer state
    (into an optimizer that has none, as in a new process), the RNG and the data position
    of step 4, bit for bit."""
    cfg = load_config(None, [*RUN, "train.steps=6", "checkpoint.interval=0", "checkpoint.snapshot_interval=2"])
    restored = {}

    def at_step(state):
        snaps = state.checkpointer.snapshots
        if state.step == 4:
            snaps.wait()
            restored["want"], restored["data"] = live_state(state), state.data.state_dict()
        if state.step == 5:
            restored["steps"] = snaps.steps()
            state.optimizer.state.clear()
            state.data.next_batch()  # the data moved on
            torch.rand(3)  # and so did the RNG
            snaps.restore(4)
            restored["got"], restored["data_got"] = live_state(state), state.data.state_dict()

    hooks = Hooks()
    hooks.add("after_step", at_step)
    train(cfg, tmp_path / "run", hooks)
    assert restored["steps"] == [2, 4]
    want, got = restored["want"], restored["got"]
    assert want.keys() == got.keys() and any(k.startswith("optim/") for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert restored["data"] == restored["data_got"]


def test_a_kill_right_after_and_right_before_a_snapshot_resumes_from_it(tmp_path):
    """One worker under the launcher, a snapshot every 4 steps and no disk checkpoint: killed
    at the start of step 6 (the snapshot of step 4 complete) it resumes from step 4; killed at
    the start of step 12, before that step's snapshot, from step 8. It ends bit-identical to a
    run that was never killed, and the snapshot memory is gone when the job ends."""
    sets = ["train.steps=13", "checkpoint.interval=0", "checkpoint.snapshot_interval=4", "parallel.max_restarts=3"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    train(load_config(None, [*RUN, *sets[:3], "parallel.max_restarts=0"]), clean)  # one thread, as the worker
    cli(killed, *sets, "chaos.at=kill@6,kill@12")
    assert [e["step"] for e in events(killed, "snapshot_load")] == [4, 8]
    assert not events(killed, "checkpoint_load")
    starts = events(killed, "run_start")
    assert [e["restart"] for e in starts] == [0, 1, 2]  # the process itself was gone: new ones
    assert_same_weights(killed, clean)
    assert not run_root(killed).exists()


def test_faults_on_one_rank_restart_that_rank_alone_and_its_peer_in_process(tmp_path):
    """Two ranks (DDP) under anychip's agent, three faults, one run:
    - rank 1 raises at the start of step 4 while rank 0 goes on into the step's gradient
      all-reduce: rank 0's collective fails at once (rank 1 shut its connections) and both
      ranks re-enter training in their processes within 2 s, from the snapshot of step 3;
    - rank 1 is killed at step 8: the agent starts rank 1 alone on its warm spare, rank 0
      restarts in its process;
    - rank 0 hangs at step 12 (holding the GIL) while rank 1 waits for it in the all-reduce:
      the watchdog kills rank 0 only (its interpreter stopped; rank 1's did not), which is
      started alone again, and rank 1 restarts in its process.
    The run ends bit-identical to one without faults."""
    sets = ["train.steps=14", "parallel.nproc=2", "parallel.strategy=ddp", "checkpoint.interval=0"]
    sets += ["parallel.max_restarts=4", "guards.watchdog_grace_s=2"]
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    cli(clean, *sets)
    cli(faulty, *sets, "chaos.at=exception@4:1,kill@8:1,hang@12:0")
    inject = {e["kind"]: e for e in events(faulty, "chaos_inject")}
    failed = [e for e in events(faulty, "worker_failed") if e["time"] < inject["kill"]["time"]]
    failed = {e["rank"]: e for e in failed}
    assert failed[1]["origin"] and "ChaosError" in failed[1]["error"]
    assert not failed[0]["origin"] and "Connection" in failed[0]["error"]  # it was inside a collective
    restarts = [(e["rank"], e["generation"], e["step"]) for e in events(faulty, "restart_in_process")]
    # the exception: both ranks, from step 3; the kill: rank 0; the hang: rank 1 (both from the
    # newest snapshot, or the one before when the kill came during the copy of the newest)
    assert restarts[:2] in ([(0, 1, 3), (1, 1, 3)], [(1, 1, 3), (0, 1, 3)])
    assert [(r, g) for r, g, _ in restarts[2:]] == [(0, 2), (1, 3)]
    assert restarts[2][2] in (6, 7) and restarts[3][2] in (10, 11)
    for e in events(faulty, "restart_in_process")[:2]:
        assert e["time"] - inject["exception"]["time"] < 2.0
    # the agent started one rank alone for each dead process: first on its warm spare
    alone = [(e["rank"], e["scope"]) for e in events(faulty, "worker_restart")]
    assert alone == [(1, "rank"), (0, "rank")]
    assert events(faulty, "worker_restart")[0]["spare"]
    [hang] = events(faulty, "hang_detected")  # the hung rank only, not the one waiting for it
    assert hang["rank"] == 0
    starts = events(faulty, "run_start")  # rank 0's: its first process, twice; then the new one
    assert [e["generation"] for e in starts] == [0, 1, 2, 3]
    assert starts[0]["pid"] == starts[1]["pid"] == starts[2]["pid"] != starts[3]["pid"]
    assert not events(faulty, "checkpoint_load")
    assert_same_weights(faulty, clean)


def test_no_room_in_shared_memory_turns_snapshots_off_and_training_goes_on(tmp_path, monkeypatch):
    """A full /dev/shm (Docker gives 64 MB by default) is an error when the slot is reserved, not
    a SIGBUS at the first write: one event and warning, no more snapshots, the run completes."""
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    run = tmp_path / "run"
    state = train(load_config(None, [*RUN, "train.steps=4", "checkpoint.interval=0"]), run)
    assert state.step == 4
    [failed] = events(run, "snapshot_failed")
    assert failed["step"] == 1 and failed["snapshots"] == "off" and "No space left" in failed["error"]
    assert not (run_root(run) / "rank0").exists()
