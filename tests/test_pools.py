"""Pools (anychip/pools): runs of two pools of one process each, a lighthouse, gloo, on CPU."""

import json
import platform
import random
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import CLI_ENV, DEBUG_RUN
from safetensors.torch import load_file

from anychip.config import load_config
from anychip.pools.timeline import timeline
from anychip.report.page import write_report
from anychip.train.loop import train

if platform.machine() != "x86_64" or sys.platform != "linux":  # where `make setup` installs torchft
    pytest.skip("torchft 0.2.0 has wheels for Linux x86-64 only", allow_module_level=True)

STEPS = 12
RUN = [*DEBUG_RUN, f"train.steps={STEPS}", "train.global_batch=4", "checkpoint.interval=4", "eval.interval=0"]


def run_pools(run, sets, *args, count=2):
    """`anychip train --pools 2` to the end; returns its output."""
    cmd = [sys.executable, "-m", "anychip.cli", "train", "--pools", str(count), "--run-dir", str(run), *args]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=CLI_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stderr


def records(path, kind=None):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if kind is None or r.get("event") == kind]


def by_step(run):
    return {m["step"]: m for m in records(run / "metrics.jsonl")}


@pytest.fixture(scope="module")
def per_step(tmp_path_factory):
    run = tmp_path_factory.mktemp("pools") / "run"
    run_pools(run, RUN)
    return run


def test_two_pools_make_the_steps_of_one_job_of_the_same_global_batch(per_step, tmp_path):
    one = by_step(train(load_config(None, RUN), tmp_path / "one").run_dir)
    pools = [by_step(per_step / f"pool{i}") for i in range(2)]
    assert sorted(one) == sorted(pools[0]) == sorted(pools[1]) == list(range(1, STEPS + 1))
    for step, m in one.items():
        for pool in pools:
            assert pool[step]["loss"] == pytest.approx(m["loss"], rel=1e-5), f"step {step}"
            assert pool[step]["tokens"] == m["tokens"]  # the whole global batch's targets, summed over the pools
            assert pool[step]["pools"] == 2
    # both pools hold the same model at the end, bit for bit
    a, b = (load_file(per_step / f"pool{i}" / "final" / "model.safetensors") for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    launcher = records(per_step / "events.jsonl")
    assert [e["pool"] for e in launcher if e["event"] == "pool_started"] == ["pool0", "pool1"]
    assert launcher[-1]["event"] == "run_end" and launcher[-1]["status"] == "done"


def test_a_lost_pool_leaves_the_other_training_and_takes_a_live_pools_state_when_it_returns(tmp_path):
    lost_at, steps = random.randint(3, 8), 30
    run, timeout_s = tmp_path / "run", 2.0
    # after the loss every step of pool 0 sleeps 0.5 s: the run lasts until pool 1 is back (about 5 s)
    sets = [*RUN, f"train.steps={steps}", f"pools.timeout_s={timeout_s}", "parallel.max_restarts=0"]
    sets += ["chaos.slow_s=0.5", f"chaos.slow_steps={steps}"]
    run_pools(run, sets, "--chaos", f"pool_loss@{lost_at}:1,slow@{lost_at + 1}:0")
    why = f"pool 1 lost at step {lost_at}"
    launcher = records(run / "events.jsonl")
    # pool 0 never restarted; pool 1 died whole (SIGKILL) once and was started again from its run directory
    assert [(e["pool"], e["attempt"]) for e in launcher if e["event"] == "pool_started"] == [
        ("pool0", 0),
        ("pool1", 0),
        ("pool1", 1),
    ], why
    assert [(e["pool"], e["code"]) for e in launcher if e["event"] == "pool_exited"][0] == ("pool1", -9), why
    a, b = run / "pool0", run / "pool1"
    assert len(records(a / "events.jsonl", "run_start")) == 1 and not records(a / "events.jsonl", "worker_failed")
    # pool 0's next step came within the timeout plus one step of the loss
    death = records(b / "events.jsonl", "chaos_inject")[0]["time"]
    steps_n, steps = steps, by_step(a)
    times = [steps[s]["time"] for s in sorted(steps)]
    step_s = statistics.median(t1 - t0 for t0, t1 in zip(times, times[1:]))
    after = min(t for t in times if t > death)
    assert after - death <= timeout_s + step_s + 1.0, f"{why}: {after - death:.2f} s, step {step_s:.2f} s"
    assert sorted(steps) == list(range(1, steps_n + 1)), why
    # the step that the loss broke was done again (with the pools left), not applied half-exchanged
    assert [e["step"] for e in records(a / "events.jsonl", "pool_step_discarded")] == [lost_at], why
    assert [e["pool"] for e in records(a / "events.jsonl", "pool_lost")] == ["pool1"], why
    # pool 1 came back with pool 0's weights, bit for bit, before its first step after rejoining
    (recovered,) = records(b / "events.jsonl", "pool_recovered")
    sent = [e for e in records(a / "events.jsonl", "pool_state_sent") if e["step"] == recovered["step"]]
    assert recovered["source"] == "pool0" and recovered["step"] >= lost_at - 1, why
    assert sent and sent[-1]["weights"] == recovered["weights"], why
    first_after = min(s for s in by_step(b) if by_step(b)[s]["time"] > recovered["time"])
    assert first_after == recovered["step"] + 1, why
    # and the two pools end with the same model, bit for bit
    fa, fb = (load_file(p / "final" / "model.safetensors") for p in (a, b))
    assert all(torch.equal(fa[k], fb[k]) for k in fa), why
    # the timeline that `anychip goodput` and `anychip report` show
    t = timeline(run)
    (loss,) = t.losses
    assert loss["pool"] == "pool1" and loss["next_step_s"] == pytest.approx(after - death, abs=0.1), why
    assert loss["rejoin_s"] == pytest.approx(recovered["time"] - loss["time"], abs=1e-6), why
    assert [(r[0], r[1]) for r in t.steps["pool1"]] == [(1, lost_at - 1), (recovered["step"] + 1, steps_n)], why
    page = write_report(run).read_text()
    assert "pool1" in page and "Pools lost" in page and (b / "report.html").is_file()


def test_diloco_sends_an_eighth_of_the_bytes_and_reaches_the_held_out_loss_of_per_step_sync(tmp_path):
    # tiny, the same tokens both ways: 48 steps of 16 sequences of 64 tokens, the held-out loss at the end
    tiny = [
        "train.steps=48",
        "train.warmup_steps=4",
        "train.global_batch=16",
        "train.seq_len=64",
        "eval.interval=48",
        "eval.n=0",
        "checkpoint.interval=0",
        "parallel.max_restarts=0",
        "log.tensorboard=false",
        "device.type=cpu",
    ]
    runs = {}
    for sync in ("step", "diloco"):
        runs[sync] = tmp_path / sync
        run_pools(runs[sync], [*tiny, f"pools.sync={sync}", "pools.sync_every=8"])
    sent = {sync: [m["pool_bytes"] for m in by_step(run / "pool0").values()] for sync, run in runs.items()}
    assert len(sent["step"]) == len(sent["diloco"]) == 48
    per_step = sum(sent["step"]) / 48
    assert sum(sent["diloco"]) / 48 <= per_step / 8
    assert sum(1 for b in sent["diloco"] if b) == 6  # one exchange every 8 steps
    held_out = {sync: by_step(run / "pool0")[48]["eval_loss"] for sync, run in runs.items()}
    assert held_out["diloco"] <= held_out["step"] * 1.05, held_out
