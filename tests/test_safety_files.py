"""The run's files survive crashes and long runs: a line cut short by a crash swallows no later record,
experts.jsonl stays bounded, `anychip status` never reads it, the heatmap stays small, and text with
rich markup in it (a run directory named `[/x]`) prints as it is."""

import io
import json
import sys

import pytest
import torch
from rich.console import Console
from rich.markup import escape

import anychip.report.run as report_run
from anychip.cli import main
from anychip.events import append_event, read_jsonl
from anychip.models.deepseek.model import DeepSeekV3
from anychip.models.deepseek.presets import PRESETS
from anychip.report import plots
from anychip.report.run import load_run
from anychip.report.status import print_status
from anychip.train.runlog import RunLog

CUT = '{"time": 3.0, "event": "chaos_inj'  # a record cut short by a crash


def write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def quiet_log(run_dir, total_steps=30, log_interval=1) -> RunLog:
    return RunLog(run_dir, True, total_steps, tensorboard=False, progress=False, log_interval=log_interval)


# -- a line cut short by a crash ----------------------------------------------------------------------


def test_an_event_appended_after_a_cut_line_is_read_and_the_cut_line_is_skipped(tmp_path):
    before = [{"time": 1.0, "event": "run_start"}, {"time": 2.0, "event": "checkpoint_commit", "step": 5}]
    write_lines(tmp_path / "events.jsonl", before, tail=CUT)
    append_event(tmp_path, "chaos_inject", kind="kill", step=17, rank=0)
    records = read_jsonl(tmp_path / "events.jsonl")
    assert records[:2] == before and len(records) == 3
    assert records[2]["event"] == "chaos_inject" and records[2]["step"] == 17
    assert (tmp_path / "events.jsonl").read_text().splitlines()[2] == CUT  # kept, on a line of its own


def test_runlog_ends_cut_lines_before_it_appends(tmp_path):
    for name in ("events.jsonl", "metrics.jsonl", "experts.jsonl"):
        write_lines(tmp_path / name, [{"step": 1, "time": 1.0, "event": "x"}], tail=CUT)
    log = quiet_log(tmp_path)
    log.event("restart", count=1)
    log.metrics(2, {"loss": 1.5})
    log.expert_load(1, torch.tensor([[3.0, 1.0]]), ["layers.1"])
    log.close()
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["event"] for e in events] == ["x", "restart"] and events[1]["count"] == 1
    assert [m["step"] for m in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert read_jsonl(tmp_path / "experts.jsonl")[1]["tokens"] == [[3, 1]]


def test_appending_to_an_intact_or_a_new_file_adds_no_empty_line(tmp_path):
    append_event(tmp_path, "run_start")
    append_event(tmp_path, "run_end", status="ok")
    log = quiet_log(tmp_path)
    log.event("restart", count=1)
    log.close()
    lines = (tmp_path / "events.jsonl").read_text().split("\n")
    assert len(lines) == 4 and lines[-1] == "" and all(lines[:3])


def test_read_jsonl_skips_only_the_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo\n\n\x00\x00\x00\n{"step": \xff}\n[1, 2]\n{"step": 3}\n{"step": 4')
    assert read_jsonl(path) == [{"step": 1}, {"step": 3}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


# -- experts.jsonl stays bounded ------------------------------------------------------------------------


def test_experts_of_a_million_step_v3_run_fit_in_50_mb(tmp_path):
    args = PRESETS["v3"]
    with torch.device("meta"):
        layers = DeepSeekV3(args).moe_layer_names()  # 58 MoE layers and the MTP module's
    # a step of DeepSeek-V3's pre-training: 15360 sequences x 4096 tokens, K_r = 8 of N_r = 256 experts each
    per_expert = 15360 * 4096 * args.num_experts_per_tok / args.n_routed_experts
    torch.manual_seed(0)
    step = (per_expert * (0.5 + torch.rand(len(layers), args.n_routed_experts))).round()
    steps, log_interval = 1_000_000, 10
    log = quiet_log(tmp_path, steps, log_interval)
    log.expert_load(1, step, layers)
    span = log.experts_interval
    assert span % log_interval == 0 and span > log_interval
    for s in range(span + 1, 2 * span + 1):  # one whole span of steps: its record is as long as any
        log.expert_load(s, step, layers)
    log.close()
    lines = (tmp_path / "experts.jsonl").read_bytes().splitlines()
    first, full = (json.loads(line) for line in lines)
    assert (first["step"], full["step"]) == (1, 2 * span)
    assert torch.equal(torch.tensor(full["tokens"], dtype=torch.float64), step.double() * span)  # exact counts
    record_bytes = max(len(line) + 1 for line in lines)
    assert record_bytes > 100_000  # a record is ~100 KB: every step's record would be ~10 GB
    assert (steps // span + 2) * record_bytes <= 50e6


def test_a_small_run_records_every_log_interval_with_every_token(tmp_path):
    log = quiet_log(tmp_path, total_steps=25, log_interval=10)
    for s in range(1, 26):
        log.expert_load(s, torch.tensor([[s, 0.0], [1.0, 2.0]]), ["layers.1", "mtp.0.block"])
    log.close()
    records = read_jsonl(tmp_path / "experts.jsonl")
    assert log.experts_interval == 10
    assert [r["step"] for r in records] == [1, 10, 20, 25]
    assert [r["tokens"] for r in records] == [
        [[1, 0], [1, 2]],
        [[sum(range(2, 11)), 0], [9, 18]],
        [[sum(range(11, 21)), 0], [10, 20]],
        [[sum(range(21, 26)), 0], [5, 10]],
    ]
    assert records[0]["layers"] == ["layers.1", "mtp.0.block"]


def test_counts_not_yet_recorded_are_written_at_close(tmp_path):
    log = quiet_log(tmp_path, total_steps=100, log_interval=10)
    for s in range(1, 14):  # the run stops at step 13
        log.expert_load(s, torch.tensor([[1.0, 3.0]]), ["layers.1"])
    log.close()
    assert [(r["step"], r["tokens"]) for r in read_jsonl(tmp_path / "experts.jsonl")] == [
        (1, [[1, 3]]),
        (10, [[9, 27]]),
        (13, [[3, 9]]),
    ]


# -- status and report of a long run ---------------------------------------------------------------------


@pytest.fixture
def long_run(tmp_path):
    """A finished run of 20000 steps with 2000 expert records (14 MoE layers x 32 experts)."""
    run = tmp_path / "long"
    run.mkdir()
    events = [{"time": 0.0, "event": "run_start"}, {"time": 2000.0, "event": "run_end", "status": "ok"}]
    write_lines(run / "events.jsonl", events)
    metrics = [{"step": s, "time": s / 10, "step_time": 0.1, "loss": 1.0} for s in range(1, 20001)]
    write_lines(run / "metrics.jsonl", metrics)
    layers = [f"layers.{i}" for i in range(1, 15)]
    with open(run / "experts.jsonl", "w") as f:
        for r in range(1, 2001):
            tokens = [[(e * 7 + r * (i + 1)) % 50 + 10 for e in range(32)] for i in range(14)]
            f.write(json.dumps({"step": 10 * r, "time": float(r), "layers": layers, "tokens": tokens}) + "\n")
    return run


def test_status_does_not_read_experts_jsonl(long_run, monkeypatch, capsys):
    read = []

    def recording(path):
        read.append(path.name)
        return read_jsonl(path)

    monkeypatch.setattr(report_run, "read_jsonl", recording)
    assert main(["status", str(long_run)]) == 0 and "step 20000" in capsys.readouterr().out
    assert main(["status", str(long_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["state"] == "finished"
    assert read and "experts.jsonl" not in read
    assert len(load_run(long_run).experts) == 2000  # the report still gets them
    assert read[-1] == "experts.jsonl"


def test_the_heatmap_of_thousands_of_records_stays_small(long_run):
    run = load_run(long_run)
    svg = plots.expert_load(run)
    assert svg.count("<image") == 12 + 1  # one picture per layer drawn (12 of 14) and the colour bar
    assert len(svg) < 600_000
    run.experts = run.experts[:20]  # a short run: the same figure, about the same size
    assert 0.5 < len(svg) / len(plots.expert_load(run)) < 2


def test_adjacent_records_are_summed_into_at_most_max_columns():
    records = [{"step": 2 * i, "tokens": [[i, 1], [0, i]]} for i in range(1, 6)]
    edges, grids = plots.merge_records(records, [0, 1], max_columns=2)
    assert edges == [0, 6, 10]  # steps 1-6 (records 1-3) and 7-10 (records 4-5)
    assert grids[0].tolist() == [[6, 3], [9, 2]] and grids[1].tolist() == [[0, 6], [0, 9]]
    edges, grids = plots.merge_records(records, [1], max_columns=200)
    assert edges == [0, 2, 4, 6, 8, 10] and grids[0].tolist() == [[0, i] for i in range(1, 6)]


# -- text with rich markup in it -------------------------------------------------------------------------


def test_runlog_prints_escaped_text_as_it_is_and_keeps_its_colour(tmp_path):
    log = quiet_log(tmp_path / "[/x]")
    log.console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=200)
    log.print(f"[yellow]step 3: {escape('loss [/yellow] spike in [bold]')}; rolled back[/yellow]")
    out = log.console.file.getvalue()
    assert "step 3: loss [/yellow] spike in [bold]; rolled back" in out and "\x1b[33m" in out  # yellow
    log.close()


def test_a_line_that_is_not_markup_is_printed_not_raised(tmp_path):
    log = quiet_log(tmp_path)
    log.console = Console(file=io.StringIO(), width=200)
    log.print(f"anychip train: -> {tmp_path / '[/x]'}")
    assert f"-> {tmp_path}/[/x]" in log.console.file.getvalue()
    log.close()


def test_the_progress_line_shows_markup_as_text(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    log = RunLog(tmp_path / "[/x]", True, 10, tensorboard=False, progress=True)
    log.advance(1, "loss [/x] 1.0")
    log.close()  # the last refresh draws the status


def test_status_of_a_run_named_with_markup(long_run, tmp_path):
    run_dir = tmp_path / "[/x]"  # the directory "x]" in "["
    run_dir.parent.mkdir()
    long_run.rename(run_dir)
    (run_dir / "fatal.json").write_text(json.dumps({"error": "GuardStop: [/red] at step [9]"}))
    console = Console(file=io.StringIO(), width=300)
    print_status(load_run(run_dir), console=console)
    out = console.file.getvalue()
    assert str(run_dir) in out and "stopped: GuardStop: [/red] at step [9]" in out
