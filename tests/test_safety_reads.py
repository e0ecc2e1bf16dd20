"""What a run directory holds is untrusted input: `anychip status`, the report and a restart read only
regular files inside the run, with caps, the tail of long logs where the tail is all they need; every
malformed record is skipped and counted, never a traceback; terminal output shows control characters
instead of sending them. Each case as a copied or planted run would present it."""

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import CLI_ENV, DEBUG_RUN, run_command

import anychip.events as events
from anychip.cli import main
from anychip.guards.spike import Spike
from anychip.report.page import render
from anychip.report.run import STATUS_METRICS, load_run

T0 = 1_700_000_000.0
METRIC = '{"step": %d, "time": %.3f, "loss": %.4f, "lm_loss": 2.0, "lr": 0.001, "grad_norm": 1.0, "step_time": 0.02, "tokens_per_s": 4000.0, "mfu": 0.01, "expert_imbalance": 1.5, "memory_peak_gb": 0.45}\n'  # noqa: E501


def small_run(path: Path, steps: int = 3, finished: bool = True) -> Path:
    """A run of ``steps`` steps, as anychip writes it: finished, or stopped without a word (its state read
    from the heartbeats too)."""
    path.mkdir(parents=True)
    (path / "config.toml").write_text(f'[train]\nsteps = {steps}\nmode = "pretrain"\n[model]\npreset = "debug"\n')
    start = {"time": T0, "event": "run_start", "device": "cpu", "world_size": 1, "parameters": 77760}
    end = {"time": T0 + steps, "event": "run_end", "status": "ok"}
    (path / "events.jsonl").write_text(json.dumps(start) + "\n" + (json.dumps(end) + "\n" if finished else ""))
    (path / "metrics.jsonl").write_text("".join(METRIC % (s, T0 + s, 3.0 - 0.1 * s) for s in range(1, steps + 1)))
    return path


def status(run: Path, capsys) -> str:
    assert main(["status", str(run)]) == 0
    return capsys.readouterr().out


# -- files that are not what their name says -------------------------------------------------------------


def test_a_fifo_in_heartbeat_does_not_block_status(tmp_path, capsys):
    run = small_run(tmp_path / "run", finished=False)
    (run / "heartbeat").mkdir()
    fifo = run / "heartbeat" / "0.json"
    os.mkfifo(fifo)
    result = []
    worker = threading.Thread(target=lambda: result.append(status(run, capsys)), daemon=True)
    worker.start()
    worker.join(timeout=15)
    try:
        assert result, "anychip status blocked on a FIFO in heartbeat/"
        out = " ".join(result[0].split())  # the table wraps long values
        assert "interrupted" in out and "step 3 of 3" in out
        assert "heartbeat/0.json: a FIFO, not a regular file; not read" in out
    finally:
        with contextlib.suppress(OSError):  # release a reader stuck in open() (the code before this test's fix)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)


def test_a_link_to_dev_zero_is_not_read(tmp_path):
    run = small_run(tmp_path / "run", finished=False)
    (run / "heartbeat").mkdir()
    (run / "heartbeat" / "0.json").symlink_to("/dev/zero")  # read to its end: memory runs out
    (run / "eval.json").symlink_to("/dev/zero")

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    p = subprocess.run(
        [sys.executable, "-m", "anychip.cli", "status", str(run)],
        env=CLI_ENV, capture_output=True, text=True, timeout=120, preexec_fn=limit_memory,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    out = " ".join(p.stdout.split())
    assert "heartbeat/0.json: leads out of the run (to /dev/zero); not read" in out
    assert "eval.json: leads out of the run (to /dev/zero); not read" in out and "step 3 of 3" in out


def test_a_link_out_of_the_run_is_not_read_and_a_link_within_it_is(tmp_path, capsys):
    elsewhere = small_run(tmp_path / "elsewhere", steps=7)
    run = small_run(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(elsewhere / "metrics.jsonl")
    out = " ".join(status(run, capsys).split())
    assert "step 0 of 3" in out and "metrics.jsonl: leads out of the run" in out
    (run / "metrics.jsonl").unlink()
    (run / "kept.jsonl").write_text((elsewhere / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").symlink_to("kept.jsonl")
    assert load_run(run).last_step == 7 and load_run(run).skipped == []


# -- malformed records: skipped, counted, shown -------------------------------------------------------------


def _append(name: str, text: str):
    def make(run: Path) -> None:
        with open(run / name, "a") as f:
            f.write(text)

    return make


def _replace(name: str, text: str):
    return lambda run: (run / name).write_text(text)


DEEP = '{"time": 1.0, "event": "x", "d": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
MALFORMED = {
    "event-without-event-key": (_append("events.jsonl", '{"time": 1700000001.5, "step": 2}\n'), "events.jsonl: 1 malformed record skipped"),  # noqa: E501
    "deep-nesting": (_append("events.jsonl", DEEP), "events.jsonl: 1 malformed record skipped"),
    "bad-toml": (_replace("config.toml", "[train\nsteps = 3\n"), "config.toml: not TOML"),
    "string-time": (_append("events.jsonl", '{"time": "soon", "event": "run_start"}\n'), "events.jsonl: 1 malformed record skipped"),  # noqa: E501
    "metrics-without-step": (_append("metrics.jsonl", '{"time": 1700000004.0, "step_time": 0.1, "loss": 2.0}\n'), "metrics.jsonl: 1 malformed record skipped"),  # noqa: E501
    "string-accuracy": (_replace("eval.json", '{"accuracy": "high", "n": 10}'), "eval.json: not a held-out result"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_input_is_skipped_and_said_by_status(tmp_path, capsys, case):
    make, note = MALFORMED[case]
    run = small_run(tmp_path / "run")
    make(run)
    out = " ".join(status(run, capsys).split())
    assert "skipped " in out and note in out, out
    assert "finished" in out and "loss 2.9 at step 1 -> 2.7 at step 3" in out  # the good records still count
    assert main(["status", str(run), "--json"]) == 0
    assert note in json.loads(capsys.readouterr().out)["summary"]["skipped"]


def test_the_report_of_a_run_with_every_malformed_input_says_what_it_skipped(tmp_path):
    run = small_run(tmp_path / "run")
    for make, _ in MALFORMED.values():
        make(run)
    (run / "experts.jsonl").write_text('{"step": 1, "tokens": [["a"]]}\n{"step": 1, "tokens": [[3, 1]]}\n')
    loaded = load_run(run)
    page = render(loaded)
    for _, note in MALFORMED.values():
        if note.startswith("events.jsonl"):  # three of the six
            note = "events.jsonl: 3 malformed records skipped"
        assert note in page, note
    assert "<h2>Expert load</h2>" in page and "experts.jsonl: 1 malformed record skipped" in loaded.skipped


def test_goodput_skips_malformed_records_and_says_so(tmp_path, capsys):
    run = small_run(tmp_path / "run")
    _append("events.jsonl", '{"time": 1700000002.0, "event": "checkpoint_save", "stall_s": "long"}\n')(run)
    assert main(["goodput", str(run)]) == 0
    out = capsys.readouterr().out
    assert "3 steps" in out and "skipped: events.jsonl: 1 malformed record skipped" in out


def test_a_malformed_events_line_does_not_stop_a_resume(tmp_path):
    run = tmp_path / "run"
    sets = [*DEBUG_RUN, "train.global_batch=2", "checkpoint.interval=2", "eval.interval=0", "parallel.max_restarts=0"]

    def train(*args: str, steps: int):
        argv = [sys.executable, "-m", "anychip.cli", "train", "--nproc", "1", *args]
        for s in (*sets, f"train.steps={steps}"):
            argv += ["--set", s]
        return run_command(argv, CLI_ENV, timeout=180)

    r = train("--run-dir", str(run), steps=2)
    assert r.returncode == 0, r.stderr[-3000:]
    bad = ['{"time": 1.0, "step": 2}', '{"time": "x", "event": "run_start"}', "[" * 50_000]
    with open(run / "events.jsonl", "a") as f:
        f.write("\n".join(bad) + "\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"time": 2.0, "loss": 1.0}\n')
    r = train("--resume", str(run), steps=3)
    assert r.returncode == 0, r.stderr[-3000:]
    records = events.read_jsonl(run / "events.jsonl")
    assert [e.get("step") for e in records if e.get("event") == "checkpoint_load"] == [2]
    assert [e.get("status") for e in records if e.get("event") == "run_end"] == ["ok", "ok"]
    assert records.skipped == 1 and sum(e.get("step") == 2 and "event" not in e for e in records) == 1  # kept


# -- terminal output ------------------------------------------------------------------------------------------


def test_status_shows_escape_sequences_from_fatal_json_instead_of_sending_them(tmp_path, capsys):
    run = small_run(tmp_path / "run")
    (run / "fatal.json").write_text(json.dumps({"error": "boom\x1b[2J\x1b]0;owned\x07\r done"}))
    out = status(run, capsys)
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "stopped: boom\\x1b[2J\\x1b]0;owned\\x07\\r done" in out


# -- long logs: what is read ----------------------------------------------------------------------------------


@pytest.fixture
def long_metrics(tmp_path) -> Path:
    """A run of 40000 steps (an 8.5 MB metrics.jsonl) that crashed: no run_end."""
    return small_run(tmp_path / "long", steps=40_000, finished=False)


def test_a_restart_reads_only_the_end_of_a_long_metrics_file(long_metrics):
    spike = Spike(SimpleNamespace(spike_window=50, max_rollbacks=3), long_metrics)
    tracemalloc.start()
    try:
        spike.started(39_990)
        last = events.read_jsonl_tail(long_metrics / "metrics.jsonl", schema=events.METRIC, enough=bool)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [h[0] for h in spike.history] == list(range(39_941, 39_991))
    assert last[-1]["step"] == 40_000 and len(last) < 1000 and last.unread > 8_000_000
    assert peak < 2_000_000  # the file is 8.5 MB: its end only


def test_status_keeps_only_the_figures_it_shows_and_a_long_file_is_read_from_its_end(long_metrics, monkeypatch):
    run = load_run(long_metrics, metric_keys=STATUS_METRICS)
    assert len(run.metrics) == 40_000 and set(run.metrics[0]) <= set(STATUS_METRICS)
    assert "lr" in load_run(long_metrics).metrics[0]  # the report gets every figure
    monkeypatch.setattr(events, "MAX_READ_BYTES", 1 << 20)
    run = load_run(long_metrics, metric_keys=STATUS_METRICS)
    assert run.last_step == 40_000 and 4000 < len(run.metrics) < 6000  # about 1 MiB of 212-byte lines
    assert any(note.startswith("metrics.jsonl: only its last 1.0 MiB read") for note in run.skipped)
