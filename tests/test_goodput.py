"""`anychip goodput` on synthetic run directories: time buckets and the fault table."""

import json

import pytest

from anychip.cli import main
from anychip.goodput import format_goodput, goodput


def write_run(run, events, metrics):
    run.mkdir(parents=True, exist_ok=True)
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def ev(time, event, **fields):
    return {"time": time, "event": event, **fields}


def steps(first, last, t0, step_time=0.5):
    """Metrics of steps first..last, one every step_time seconds, the first ending at t0."""
    return [
        {"step": s, "time": t0 + (s - first) * step_time, "step_time": step_time, "loss": 1.0}
        for s in range(first, last + 1)
    ]


@pytest.fixture
def run(tmp_path):
    events = [
        ev(90.0, "run_start"),
        ev(100.0, "chaos_inject", kind="nan", step=5, rank=0),
        ev(100.2, "nonfinite", step=5, loss="nan", grad_norm="nan", action="retry"),
        ev(102.0, "chaos_inject", kind="bitflip", step=7, rank=1),  # never detected
        ev(104.0, "hang_detected", rank=1, pid=123, step=10, silent_s=30.0, timeout_s=30.0),  # real, not injected
        ev(110.0, "run_start"),
        ev(113.0, "run_end", status="ok"),
    ]
    # steps 1..4 end at 98.0..99.5, step 5 at 101.0 after the nan, steps 6..10 until 103.5;
    # after the hang the run restarts and does steps 9..12 (9 and 10 again) from 111.0
    metrics = steps(1, 4, 98.0) + steps(5, 10, 101.0) + steps(9, 12, 111.0)
    return write_run(tmp_path / "run", events, metrics)


def test_time_buckets_still_add_up(run):
    g = goodput(run)
    assert g.wall_s == pytest.approx(113.0 - 90.0)
    assert g.steps == 12 and g.recomputed_steps == 2 and g.restarts == 1
    assert g.productive_s == pytest.approx(12 * 0.5) and g.recomputed_s == pytest.approx(2 * 0.5)
    parts = g.productive_s + g.recomputed_s + g.checkpoint_stall_s + g.restart_s
    assert parts == pytest.approx(g.wall_s)


def test_faults_are_matched_timed_and_costed(run):
    nan, bitflip, hang = goodput(run).faults
    assert nan["kind"] == "nan" and nan["injected"] and nan["detected_by"] == "nonfinite"
    assert nan["latency_s"] == pytest.approx(0.2)
    assert nan["lost_s"] == pytest.approx(101.0 - 100.0 - 0.5)
    assert bitflip["kind"] == "bitflip" and bitflip["injected"]
    assert bitflip["detected_by"] is None and bitflip["latency_s"] is None and bitflip["lost_s"] is None
    assert hang["kind"] == "hang" and not hang["injected"] and hang["detected_by"] == "hang_detected"
    assert hang["latency_s"] is None and hang["step"] == 10
    assert hang["lost_s"] == pytest.approx(111.5 - 104.0 - 0.5)  # step 10 is back at 111.5


def test_summary_per_kind(run):
    g = goodput(run)
    assert g.fault_summary == {
        "nan": {
            "count": 1,
            "injected": 1,
            "detected": 1,
            "median_latency_s": pytest.approx(0.2),
            "lost_s": pytest.approx(0.5),
        },
        "bitflip": {"count": 1, "injected": 1, "detected": 0, "median_latency_s": None, "lost_s": None},
        "hang": {"count": 1, "injected": 0, "detected": 1, "median_latency_s": None, "lost_s": pytest.approx(7.0)},
    }
    text = format_goodput(g)
    assert text.splitlines()[-4].startswith("faults")
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[-3:]}
    assert rows == {
        "nan": ["1", "1", "1", "0.20", "s", "0.50", "s"],
        "bitflip": ["1", "1", "0", "-", "-"],
        "hang": ["1", "0", "1", "-", "7.00", "s"],
    }


def test_each_detection_answers_one_injection(tmp_path):
    """A slow rank is reported every interval: the injection takes the first report only; a detection
    before the injection, or of another kind, does not count; a second kill takes the second crash."""
    events = [
        ev(0.0, "run_start"),
        ev(1.0, "straggler", step=1, rank=0, lateness_s=1.0, ratio=3.0),  # before the injection: real
        ev(2.0, "chaos_inject", kind="slow", step=3, rank=1),
        ev(2.5, "spike", step=3, metric="loss", value=9.0, median=1.0, z=8.0, action="skip"),  # real, not slow
        ev(3.0, "straggler", step=4, rank=1, lateness_s=1.0, ratio=3.0),
        ev(4.0, "straggler", step=6, rank=1, lateness_s=1.0, ratio=3.0),  # repeat: a real one
        ev(5.0, "chaos_inject", kind="kill", step=7, rank=0),
        ev(6.0, "run_start"),
        ev(6.1, "crash_detected", last_step=7, last_record=5.0),
        ev(7.0, "chaos_inject", kind="kill", step=8, rank=0),
        ev(8.0, "run_start"),
        ev(8.1, "crash_detected", last_step=8, last_record=7.0),
        ev(9.0, "checkpoint_corrupt", path="ckpt/step_5", problem="bad hash"),  # no step: lost unknown
        ev(9.5, "run_end", status="error", error="RuntimeError: boom"),
    ]
    metrics = steps(1, 6, 1.0) + steps(6, 7, 6.5) + steps(8, 9, 8.5)
    found = goodput(write_run(tmp_path / "run", events, metrics)).faults
    assert [(f["kind"], f["injected"], f["time"], f["detected_at"]) for f in found] == [
        ("straggler", False, 1.0, 1.0),
        ("slow", True, 2.0, 3.0),
        ("spike", False, 2.5, 2.5),
        ("straggler", False, 4.0, 4.0),
        ("kill", True, 5.0, 6.1),
        ("kill", True, 7.0, 8.1),
        ("checkpoint_corrupt", False, 9.0, 9.0),
        ("error", False, 9.5, 9.5),
    ]
    kill1, kill2 = (f for f in found if f["kind"] == "kill")
    assert kill1["latency_s"] == pytest.approx(1.1) and kill2["latency_s"] == pytest.approx(1.1)
    assert kill1["lost_s"] == pytest.approx(7.0 - 5.0 - 0.5)  # step 7 is done at 7.0
    assert kill2["lost_s"] == pytest.approx(8.5 - 7.0 - 0.5)  # step 8 at 8.5
    assert found[-2]["lost_s"] is None and found[-1]["lost_s"] is None


def test_no_faults_no_table_and_json(tmp_path, capsys):
    run = write_run(tmp_path / "run", [ev(97.0, "run_start"), ev(100.0, "run_end", status="ok")], steps(1, 4, 98.0))
    g = goodput(run)
    assert g.faults == [] and g.fault_summary == {}
    assert "faults" not in format_goodput(g)
    assert main(["goodput", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["faults"] == [] and out["fault_summary"] == {} and out["steps"] == 4


def test_json_output_holds_the_faults(run, capsys):
    assert main(["goodput", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [f["kind"] for f in out["faults"]] == ["nan", "bitflip", "hang"]
    assert out["fault_summary"]["bitflip"]["detected"] == 0
    assert out["goodput"] == pytest.approx(6.0 / 23.0)


def test_one_hang_is_one_fault(tmp_path):
    """Both ranks' watchdogs fire on one hang, and the next start records the killed worker
    as a crash (just before its run_start): one fault, matched to the injection."""
    events = [
        ev(90.0, "run_start"),
        ev(100.0, "chaos_inject", kind="hang", step=5, rank=1),
        ev(106.0, "hang_detected", rank=0, pid=1, step=4, silent_s=6.0, timeout_s=6.0),
        ev(106.1, "hang_detected", rank=1, pid=2, step=4, silent_s=6.1, timeout_s=6.0),
        ev(110.0, "crash_detected", last_step=4, last_record=106.1),
        ev(110.0, "run_start"),
        ev(120.0, "run_end", status="ok"),
    ]
    g = goodput(write_run(tmp_path / "run", events, steps(1, 4, 98.0) + steps(3, 8, 112.0)))
    assert [(f["kind"], f["injected"], f["detected_by"]) for f in g.faults] == [("hang", True, "hang_detected")]
    assert g.faults[0]["latency_s"] == pytest.approx(6.0)


def test_one_failure_is_one_fault_and_restarts_in_process_have_their_row(tmp_path):
    """An exception on rank 1: its worker_failed (origin) is the detection; rank 0's, which failed
    because of it, and rank 0's run_end are not faults of their own. A kill on rank 0: the survivor's
    worker_failed answers it, the next start's crash_detected does not count again. A hang: the
    peers' failures after the watchdog's kill are the hang's. The in-process restart (rank 0's
    record) and the snapshot stalls have rows of their own, and the rows still add up to the wall."""
    events = [
        ev(0.0, "run_start", generation=0),
        ev(3.0, "chaos_inject", kind="exception", step=5, rank=1),
        ev(3.01, "worker_failed", rank=1, origin=True, step=5, error="ChaosError: x"),
        ev(3.05, "worker_failed", rank=0, origin=False, step=5, error="RuntimeError: Connection closed"),
        ev(3.06, "run_end", status="error", error="RuntimeError: Connection closed"),
        ev(3.2, "run_start", generation=1),
        ev(3.3, "restart_in_process", rank=0, generation=1, step=4, duration_s=0.3),
        ev(3.31, "restart_in_process", rank=1, generation=1, step=4, duration_s=0.31),
        ev(6.0, "chaos_inject", kind="kill", step=9, rank=0),
        ev(6.2, "worker_failed", rank=1, origin=True, step=9, error="RuntimeError: Connection closed"),
        ev(8.9, "crash_detected", last_step=8, last_record=6.0),  # the next start, before its run_start
        ev(9.0, "run_start", generation=0),
        ev(11.0, "chaos_inject", kind="hang", step=12, rank=1),
        ev(18.0, "hang_detected", rank=1, step=12, silent_s=6.0, timeout_s=6.0),
        ev(18.1, "worker_failed", rank=0, origin=True, step=12, error="RuntimeError: Connection closed"),
        ev(18.2, "run_end", status="error", error="RuntimeError: Connection closed"),
        ev(21.0, "run_start", generation=0),
        ev(24.0, "run_end", status="ok"),
    ]
    metrics = steps(1, 4, 1.0) + steps(5, 8, 3.5) + steps(9, 11, 9.5) + steps(12, 14, 21.5)
    for m in metrics:
        m["snapshot_s"] = 0.01
    metrics[3]["snapshot_wait_s"] = 0.1
    g = goodput(write_run(tmp_path / "run", events, metrics))
    found = [(f["kind"], f["injected"], f["detected_by"]) for f in g.faults]
    assert found == [
        ("exception", True, "worker_failed"),
        ("kill", True, "worker_failed"),
        ("hang", True, "hang_detected"),
    ]
    exception = g.faults[0]
    assert exception["latency_s"] == pytest.approx(0.01)
    assert g.inprocess_restarts == 1 and g.inprocess_restart_s == pytest.approx(0.3)
    assert g.restarts == 3
    assert g.snapshot_stall_s == pytest.approx(14 * 0.01 + 0.1)
    parts = g.productive_s + g.recomputed_s + g.checkpoint_stall_s + g.snapshot_stall_s
    parts += g.inprocess_restart_s + g.restart_s
    assert parts == pytest.approx(g.wall_s)
    assert "in-process restarts" in format_goodput(g) and "(1 in process)" in format_goodput(g)
