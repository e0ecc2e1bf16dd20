"""Guards and chaos: every fault kind injected into real runs (1 and 2 processes); the run
completes by itself and, after transient faults, ends bit-identical to the fault-free run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_command
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from anychip.chaos import parse_fault, schedule
from anychip.checkpoint import committed
from anychip.config import ChaosConfig, GuardsConfig, load_config
from anychip.errors import ConfigError, GuardStop
from anychip.goodput import goodput
from anychip.guards.base import Action, StepView
from anychip.guards.nonfinite import NonFinite
from anychip.guards.sdc import RecomputeAudit, fingerprint, odd_ones_out
from anychip.guards.spike import robust_z
from anychip.train.hooks import Hooks
from anychip.train.loop import train
from anychip.train.runlog import read_jsonl as lines

RUN = [
    "model.preset=debug",
    "train.steps=30",
    "train.global_batch=4",
    "train.seq_len=48",
    "train.warmup_steps=2",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "device.type=cpu",
    "checkpoint.interval=5",
    "checkpoint.keep=3",
    "guards.spike_min_history=5",
    "guards.audit_interval=10",
    "parallel.max_restarts=0",
    # the guards' rollback targets below are the disk checkpoints'; the tests that pass
    # checkpoint.snapshot_interval=1 roll back and restart from snapshots
    "checkpoint.snapshot_interval=0",
]
DDP = [
    "parallel.nproc=2",
    "parallel.strategy=ddp",
    "guards.replica_check_interval=5",
    "guards.straggler_interval=10",
    "chaos.slow_s=0.2",
    "parallel.max_restarts=3",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_inprocess(run_dir: Path, *sets: str, hooks=None):
    return train(load_config(None, [*RUN, *sets]), run_dir, hooks)


def run_cli(run_dir: Path, *sets: str, timeout: float = 400) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run_dir)]
    for s in (*RUN, "parallel.max_restarts=3", *sets):
        args += ["--set", s]
    return run_command(args, ENV, timeout)


def recovers_bit_identical(run: Path, reference: Path, *sets: str) -> None:
    """``anychip train`` with these settings completes by itself with the reference's weights."""
    r = run_cli(run, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical(weights(run), weights(reference))


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    return [e for e in lines(run_dir / "events.jsonl") if kind is None or e["event"] == kind]


def assert_checkpoints_finite(run_dir: Path, tmp_path: Path) -> None:
    """Every committed checkpoint's model and optimizer tensors are finite."""
    dirs = committed(run_dir / "checkpoints")
    assert dirs
    for d in dirs:
        out = tmp_path / f"{d.name}.pt"
        dcp_to_torch_save(d, out)
        tensors = _tensors(torch.load(out, weights_only=True))
        assert tensors and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()), d


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else []
    return [t for v in values for t in _tensors(v)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    run_inprocess(run)
    return run


@pytest.fixture(scope="module")
def reference_ddp(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref2") / "run"
    r = run_cli(run, *DDP)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


# -- one process, in-process ----------------------------------------------------------


def test_one_off_nan_is_retried_and_the_run_stays_bit_identical(reference, tmp_path):
    run = tmp_path / "nan"
    run_inprocess(run, "chaos.at=nan@7")
    assert_identical(weights(run), weights(reference))
    [nf] = events(run, "nonfinite")
    assert nf["step"] == 7 and nf["action"] == "retry" and nf["grad_norm"] == "nan"
    assert_checkpoints_finite(run, tmp_path)


def test_a_batch_that_always_gives_nan_is_skipped_then_repeated_nans_roll_back_then_stop(tmp_path):
    def poison(batches):
        def hook(state):
            if state.data.stats["batches"] in batches:
                next(p for p in state.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")

        hooks = Hooks()
        hooks.add("after_backward", hook)
        return hooks

    run = tmp_path / "skip"
    state = run_inprocess(run, hooks=poison({12}))  # data-caused: non-finite on every attempt
    assert state.step == 30
    actions = [(e["step"], e["action"]) for e in events(run, "nonfinite")]
    assert actions == [(12, "retry"), (12, "skip")]
    [skip] = events(run, "update_skipped")
    assert skip["step"] == 12 and skip["batch"] == 12
    assert 12 not in [m["step"] for m in lines(run / "metrics.jsonl")]  # no update at step 12

    run = tmp_path / "stop"
    with pytest.raises(GuardStop, match="after 3 rollbacks"):
        run_inprocess(run, "guards.nonfinite_max=2", hooks=poison(set(range(12, 1000))))
    acts = [e["action"] for e in events(run, "nonfinite")]
    assert acts.count("rollback") == 3 and acts[-1] == "stop"
    rollbacks = events(run, "rollback")
    assert [r["to_step"] for r in rollbacks] == [10, 10, 10]
    assert_checkpoints_finite(run, tmp_path)  # nothing non-finite was ever written


def test_data_caused_spike_rolls_back_and_skips_the_window(tmp_path):
    run = tmp_path / "spike"
    state = run_inprocess(run, "train.steps=80", "chaos.at=bad_batch@70")  # loss ~2.5 there; the bad batch ~9.5
    assert state.step == 80
    [spike] = events(run, "spike")
    assert spike["step"] == 70 and spike["action"] == "rollback" and spike["metric"] == "loss" and spike["z"] > 8
    [rb] = events(run, "rollback")
    assert rb["from_step"] == 70 and rb["to_step"] == 65 and rb["skipped"] == [66, 70]
    [skipped] = events(run, "data_skipped")
    assert (skipped["first_batch"], skipped["last_batch"]) == (66, 70)
    # steps 66.. were redone on batches 71..: the poisoned batch 70 was never drawn again
    assert [e["batch"] for e in events(run, "chaos_inject")] == [70]
    losses = {m["step"]: m["loss"] for m in lines(run / "metrics.jsonl")}  # the last occurrence of each step
    assert max(losses[s] for s in range(66, 81)) < 3.0


def test_spike_that_comes_back_stops_the_run_after_bounded_rollbacks(tmp_path):
    def spike(state):  # a spike at step 22 whatever the data: rollbacks cannot get past it
        if state.step == 22:
            state.figures["loss"] = 100.0

    hooks = Hooks()
    hooks.add("after_backward", spike)
    run = tmp_path / "stop"
    with pytest.raises(GuardStop, match="2 rollbacks did not get past it"):
        run_inprocess(run, "guards.max_rollbacks=2", hooks=hooks)
    assert [e["action"] for e in events(run, "spike")] == ["rollback", "rollback", "stop"]
    assert [(r["to_step"], r["skipped"]) for r in events(run, "rollback")] == [
        (20, [21, 22]),
        (20, [21, 24]),
    ]  # all since the checkpoint


def test_recompute_audit_catches_flaky_compute_and_rolls_back(reference, tmp_path):
    run = tmp_path / "sdc"
    run_inprocess(run, "chaos.at=sdc@10")
    assert_identical(weights(run), weights(reference))
    [audit] = events(run, "audit_mismatch")
    assert audit["step"] == 10 and audit["rank"] == 0 and audit["max_rel_diff"] > 0
    [rb] = events(run, "rollback")
    assert (rb["from_step"], rb["to_step"], rb["skipped"]) == (10, 5, None)

    run = tmp_path / "sdc_snapshots"  # with snapshots: back one step, not to the checkpoint
    run_inprocess(run, "chaos.at=sdc@10", "checkpoint.snapshot_interval=1")
    assert_identical(weights(run), weights(reference))
    [rb] = events(run, "rollback")
    assert (rb["from_step"], rb["to_step"]) == (10, 9)
    assert [e["step"] for e in events(run, "snapshot_load")] == [9] and not events(run, "checkpoint_load")

    run = tmp_path / "faulty"
    with pytest.raises(GuardStop, match="rank 0 failed 2 recompute audits: faulty hardware"):
        run_inprocess(run, "chaos.at=sdc@10,sdc@20")
    [bad] = events(run, "faulty_hardware")
    assert bad["rank"] == 0 and bad["step"] == 20


def test_failed_checkpoint_write_is_survived(reference, tmp_path):
    run = tmp_path / "write"
    run_inprocess(run, "chaos.at=checkpoint_write@8")
    assert_identical(weights(run), weights(reference))
    [failed] = events(run, "checkpoint_failed")
    assert failed["step"] == 10 and "chaos" in failed["error"]
    assert 10 not in [int(d.name[5:]) for d in committed(run / "checkpoints")]


def test_guards_off_run_the_plain_loop(reference, tmp_path):
    off = ["guards.nonfinite=false", "guards.spike=false", "guards.watchdog=false", "guards.audit_interval=0"]
    run = tmp_path / "off"
    run_inprocess(run, *off)
    assert_identical(weights(run), weights(reference))
    assert events(run, "guards")[0]["installed"] == []
    with pytest.raises(FloatingPointError, match="stopping before the update"):
        run_inprocess(tmp_path / "off_nan", *off, "chaos.at=nan@7")


# -- one process under the elastic agent -----------------------------------------------


def test_hang_is_detected_fast_with_stacks_and_the_run_resumes(reference, tmp_path):
    run = tmp_path / "hang"
    recovers_bit_identical(run, reference, "chaos.at=hang@13")
    [inject] = events(run, "chaos_inject")
    [hang] = events(run, "hang_detected")
    step_times = [m["step_time"] for m in lines(run / "metrics.jsonl") if m["step"] < 13]
    median = sorted(step_times)[len(step_times) // 2]
    latency = hang["time"] - inject["time"]
    assert latency <= 2 * median + 5.0 + 2.5, latency  # deadline: 2 x median + 5 s grace; poll + stack dump
    assert hang["step"] == 12 and hang["process_state"] != "T"
    stacks = Path(hang["stacks"]).read_text()
    assert "_hang" in stacks and "before_step" in stacks  # where it hung, while it held the GIL


def test_exception_and_kill_are_restarted_and_resume_bit_identical(reference, tmp_path):
    run = tmp_path / "crash"
    recovers_bit_identical(run, reference, "chaos.at=exception@6,kill@17", "checkpoint.snapshot_interval=1")
    # the exception: in the same process, from the snapshot of step 5; the kill: a new process
    # from the newest snapshot (16, or 15 when the kill came before the copy of 16 was done)
    assert [(e["generation"], e["step"]) for e in events(run, "restart_in_process")] == [(1, 5)]
    assert [e["count"] for e in events(run, "restart")] == [1]
    loads = [e["step"] for e in events(run, "snapshot_load")]
    assert loads[0] == 5 and loads[1] in (15, 16) and not events(run, "checkpoint_load")
    assert [e["kind"] for e in events(run, "chaos_inject")] == ["exception", "kill"]  # each fired once
    g = goodput(run)
    assert {f["kind"] for f in g.faults if f.get("injected")} == {"exception", "kill"}
    assert all(f["detected_by"] is not None for f in g.faults if f.get("injected"))


def test_corrupted_checkpoint_is_skipped_on_the_restart_after_a_kill(reference, tmp_path):
    run = tmp_path / "corrupt"
    recovers_bit_identical(run, reference, "chaos.at=corrupt_checkpoint@12,kill@13")
    [bad] = events(run, "checkpoint_corrupt")
    assert bad["path"].endswith("step_00000010")
    assert events(run, "checkpoint_load")[0]["step"] == 5


def test_guard_stop_is_not_retried_by_the_launcher(tmp_path):
    run = tmp_path / "fatal"
    r = run_cli(run, "chaos.at=sdc@10,sdc@20")
    assert r.returncode == 2
    assert "faulty hardware" in r.stderr
    assert events(run, "restart") == []  # the launcher's restarts exit at once
    assert len(events(run, "run_start")) <= 1 + 3


# -- two processes (DDP) ----------------------------------------------------------------


def test_bit_flip_on_one_replica_is_caught_and_rolled_back(reference_ddp, tmp_path):
    run = tmp_path / "flip"
    recovers_bit_identical(run, reference_ddp, *DDP, "chaos.at=bitflip@9:1")
    [mm] = events(run, "replica_mismatch")
    assert mm["step"] == 10 and mm["ranks"] == [0, 1] and not mm["majority"]  # two replicas: no majority
    [rb] = events(run, "rollback")
    assert rb["to_step"] == 5

    # replicas compared every step, with snapshots: back to the snapshot of the last step they agreed at
    run = tmp_path / "flip_snapshots"
    sets = ["chaos.at=bitflip@9:1", "guards.replica_check_interval=1", "checkpoint.snapshot_interval=1"]
    recovers_bit_identical(run, reference_ddp, *DDP, *sets)
    [rb] = events(run, "rollback")
    assert (rb["from_step"], rb["to_step"]) == (10, 9)
    assert [e["step"] for e in events(run, "snapshot_load")] == [9]


def test_slow_rank_is_flagged(reference_ddp, tmp_path):
    run = tmp_path / "slow"
    recovers_bit_identical(run, reference_ddp, *DDP, "chaos.at=slow@3:1")
    flagged = events(run, "straggler")
    assert flagged and {e["rank"] for e in flagged} == {1}
    assert flagged[0]["steps"] == [1, 9] and flagged[0]["ratio"] > 1.3


def test_nan_on_one_rank_is_agreed_by_all(reference_ddp, tmp_path):
    run = tmp_path / "nan1"
    recovers_bit_identical(run, reference_ddp, *DDP, "chaos.at=nan@7:1")
    [nf] = events(run, "nonfinite")
    assert nf["reporting_rank"] == 1 and nf["action"] == "retry"


# -- pieces -------------------------------------------------------------------------------


def test_fingerprint_sees_one_flipped_bit():
    ts = [torch.randn(100), torch.randn(3, 7).bfloat16()]
    before = fingerprint(ts)
    ts[1].view(torch.int16).view(-1)[5] ^= 1
    assert fingerprint(ts) != before


@pytest.mark.parametrize("before", ["off", "strict"])
def test_the_audit_recomputes_under_deterministic_algorithms_and_restores_the_setting(monkeypatch, before):
    """Both recomputes run with deterministic kernels (warning, not raising, where an op has none,
    unless the run is deterministic throughout); the setting is back afterwards, also after an error."""
    from conftest import make_args, make_model

    from anychip.device.cpu import CpuDevice

    seen = []

    def once(audit, micro):
        seen.append(
            (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        )
        return torch.ones(4, dtype=torch.float64)

    monkeypatch.setattr(RecomputeAudit, "_once", once)
    cfg = load_config(None, ["guards.audit_interval=1"]).guards
    audit = RecomputeAudit(cfg, make_model(make_args()), CpuDevice(), None, None, rank=0)
    view = StepView(step=1, figures={}, grad_norm=0.0, batch={"input_ids": torch.zeros(2, 8, dtype=torch.long)})
    torch.use_deterministic_algorithms(before == "strict")
    try:
        assert audit.judge(view).action == Action.GO
        assert seen == [(True, before == "off")] * 2
        assert torch.are_deterministic_algorithms_enabled() == (before == "strict")
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        monkeypatch.setattr(RecomputeAudit, "_once", lambda audit, micro: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            audit.judge(view)
        assert torch.are_deterministic_algorithms_enabled() == (before == "strict")
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_odd_ones_out():
    assert odd_ones_out([7, 7, 7, 7]) == ([], True)
    assert odd_ones_out([7, 7, 9, 7]) == ([2], True)
    assert odd_ones_out([7, 9]) == ([0, 1], False)


def test_robust_z():
    z, med, mad = robust_z([1.0, 1.1, 0.9, 1.0, 1.05], 3.0)
    assert med == 1.0 and mad == pytest.approx(0.05) and z == pytest.approx(2.0 / (1.4826 * 0.05))


def test_nonfinite_state_machine():
    g = NonFinite(GuardsConfig(nonfinite_max=2, max_rollbacks=1))
    seen = []
    for step in (5, 5, 6, 6):  # retry, skip; retry, skip -> 2 in a row -> rollback
        seen.append(g.judge(StepView(step, {"loss": 1.0}, float("nan"), {})).action)
    assert seen == [Action.RETRY, Action.SKIP, Action.RETRY, Action.ROLLBACK]
    assert g.judge(StepView(7, {"loss": 1.0}, 2.0, {})) is None  # finite: no objection


def test_chaos_specs_and_schedule():
    assert parse_fault("kill@30:1").key == ("kill", 30, 1)
    for bad in ("kill", "boom@3", "nan@x", "nan@0", "nan@3:r"):
        with pytest.raises(ValueError):
            parse_fault(bad)
    with pytest.raises(ConfigError, match="chaos.at"):
        load_config(None, ["chaos.at=boom@3"])
    cfg = ChaosConfig(every=10, seed=3)
    a, b = schedule(cfg, 2, 300, replicas=False), schedule(cfg, 2, 300, replicas=False)
    assert a == b and 15 <= len(a) <= 50  # about one per 10 steps, the same every time
    assert all(f.kind != "bitflip" for f in a)  # undetectable without replicas
    assert any(f.kind == "bitflip" for f in schedule(cfg, 2, 300, replicas=True))


def test_watchdog_kills_a_stopped_process(tmp_path):
    """SIGSTOP: no stack dump is possible; the watchdog notices and kills."""
    import json

    beat = tmp_path / "hb.json"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"step": 3, "phase": "step", "time": time.time(), "timeout_s": 1.0, "pid": victim.pid}
        beat.write_text(json.dumps(record))
        os.kill(victim.pid, signal.SIGSTOP)
        argv = [sys.executable, "-m", "anychip.guards.watchdog", "--heartbeat", str(beat), "--pid", str(victim.pid)]
        argv += ["--run-dir", str(tmp_path), "--stacks", str(tmp_path / "s.txt"), "--poll", "0.1"]
        dog = subprocess.run(argv, timeout=30)
        assert dog.returncode == 0
        assert victim.wait(timeout=10) == -signal.SIGKILL
        [hang] = events(tmp_path, "hang_detected")
        assert hang["process_state"] == "T" and hang["stacks"] is None and hang["silent_s"] > 1.0
    finally:
        if victim.poll() is None:
            victim.kill()


def test_chaos_soak_random_faults_end_bit_identical(tmp_path):
    """Random faults (seeded: a hang, two bit flips, a slow rank, a NaN, an exception) in a
    90-step 2-process run; the run completes alone and equals the clean run bit for bit.
    bench/chaos_soak.py does the same with `tiny` for 300 steps."""
    sets = [*DDP, "train.steps=90", "checkpoint.interval=10", "guards.replica_check_interval=10"]
    clean, soak = tmp_path / "clean", tmp_path / "soak"
    r = run_cli(soak, *sets, "chaos.every=12", "chaos.seed=5", "parallel.max_restarts=10")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(clean, *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical(weights(soak), weights(clean))
    injected = [(e["kind"], e["step"]) for e in events(soak, "chaos_inject")]
    assert sorted(k for k, _ in injected) == ["bitflip", "bitflip", "exception", "hang", "nan", "slow"]
    g = goodput(soak)
    found = {f["kind"]: f for f in g.faults if f.get("injected")}
    for kind in ("bitflip", "exception", "hang", "nan"):  # each detected, with a latency
        assert found[kind]["detected_by"] is not None and found[kind]["latency_s"] >= 0, kind
    assert g.restarts == 2 and 0 < g.ratio < 1


def test_watchdog_leaves_an_unwatched_phase_alone(tmp_path):
    """The final export and evaluation beat with no deadline: an old beat is not a hang."""
    import json

    beat = tmp_path / "hb.json"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        record = {"step": -1, "phase": "finish", "time": time.time() - 1000, "timeout_s": None, "pid": victim.pid}
        beat.write_text(json.dumps(record))
        argv = [sys.executable, "-m", "anychip.guards.watchdog", "--heartbeat", str(beat), "--pid", str(victim.pid)]
        argv += ["--run-dir", str(tmp_path), "--stacks", str(tmp_path / "s.txt"), "--poll", "0.1"]
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(argv, timeout=2)
        assert victim.poll() is None and events(tmp_path) == []
    finally:
        victim.kill()


def test_chaos_flags_accumulate(tmp_path, capsys):
    from anychip.cli import main

    assert main(["train", "--chaos", "nan@3", "--chaos", "kill@5:1", "--chaos", "every=40", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert 'at = [\n    "nan@3",\n    "kill@5:1",\n]' in out or 'at = ["nan@3", "kill@5:1"]' in out
    assert "every = 40" in out
