"""anychip report and anychip status: on a run with faults and restarts, a one-step run and a run that
is still going; and the page in a real headless browser (Debian's chromium through WebDriver)."""

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HtmlPage, run_command

from anychip.cli import main
from anychip.config import load_config
from anychip.goodput import goodput
from anychip.report.page import render, write_report
from anychip.report.plots import running_mean
from anychip.report.run import load_run
from anychip.report.summary import overview
from anychip.train.loop import train

RUN = [
    "model.preset=debug",
    "train.global_batch=4",
    "train.seq_len=48",
    "train.warmup_steps=2",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "device.type=cpu",
    "checkpoint.interval=5",
    "checkpoint.keep=3",
    "train.log_interval=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli_args(run_dir: Path, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "anychip.cli", "train", "--run-dir", str(run_dir)]
    for s in (*RUN, *sets):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory) -> Path:
    """30 steps with a NaN (retried), a killed worker (restarted from a checkpoint) and every record."""
    run = tmp_path_factory.mktemp("report") / "run"
    r = run_command(cli_args(run, "train.steps=30", "parallel.max_restarts=2", "chaos.at=nan@8,kill@17"), ENV, 300)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_status_summarises_faults_restarts_and_goodput(faulty_run, capsys):
    assert main(["status", str(faulty_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    g = goodput(faulty_run)
    assert summary["state"] == "finished" and summary["progress"] == "step 30 of 30 (100%)"
    assert summary["restarts"] == "1 (0 in process)" and summary["faults"] == "nan 1, kill 1"
    assert summary["goodput"].startswith(f"{g.ratio:.1%} (")
    assert summary["device"].endswith("(cpu)") and summary["world size"].startswith("1")
    held = [m["eval_loss"] for m in load_run(faulty_run).metrics if "eval_loss" in m]  # eval.interval 100: the last
    assert summary["held-out loss"] == f"{held[-1]:.4g} at step 30 (measured once)"
    assert {f["kind"]: (f["count"], f["detected"]) for f in out["faults"]} == {"nan": ("1", "1"), "kill": ("1", "1")}
    assert main(["status", str(faulty_run)]) == 0
    text = capsys.readouterr().out
    assert "faults by kind" in text and "finished" in text and f"{g.ratio:.1%}" in text


def test_report_has_every_figure_and_needs_no_network(faulty_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(faulty_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    page = HtmlPage(out.read_text())
    assert page.open == [] and page.fetches == []  # self-contained: nothing to load from anywhere
    headings = [
        "Summary",
        "Faults by kind",
        "Goodput timeline",
        "Loss",
        "Optimizer",
        "Throughput and memory",
        "Expert load",
        "Events",
    ]
    for h in headings:
        assert f"<h2>{h}</h2>" in out.read_text(), h
    assert "Reinforcement learning" not in page.words  # not a GRPO run
    assert "held-out lm_loss" in page.words  # the loss plot's legend
    assert page.svgs == 5  # timeline, loss, optimizer, speed, experts
    words = page.words
    # the heatmaps: one per MoE layer of the debug preset (layers 1 and 2 of 3, and the MTP module's)
    record = json.loads((faulty_run / "experts.jsonl").read_text().splitlines()[0])
    assert record["layers"] == ["layers.1", "layers.2", "mtp.0.block"] and len(record["tokens"]) == 3
    for i, name in enumerate(record["layers"], start=1):
        assert f"{name} (MoE {i} of 3)" in words, name
    for event in ("chaos_inject", "nonfinite", "crash_detected", "restart"):  # in the events table
        assert event in words, event
    assert f"{goodput(faulty_run).ratio:.1%} of" in words  # the timeline's title
    assert (faulty_run / "report.html").exists() is False  # --out was honoured
    write_report(faulty_run)
    assert (faulty_run / "report.html").is_file()


def test_experts_log_counts_every_routed_token(faulty_run):
    cfg = load_config(faulty_run / "config.toml")
    records = [json.loads(line) for line in (faulty_run / "experts.jsonl").read_text().splitlines()]
    b, n = cfg.train.global_batch, cfg.train.seq_len
    per_step = [b * n * 2, b * n * 2, b * (n - 1) * 2]  # K = 2 experts per token; MTP sees one position less
    assert records[0]["step"] == 1 and [sum(layer) for layer in records[0]["tokens"]] == per_step
    assert records[1]["step"] == 2 and [sum(layer) for layer in records[1]["tokens"]] == per_step
    assert records[2]["step"] == 4 and [sum(layer) for layer in records[2]["tokens"]] == [2 * t for t in per_step]
    assert all(len(layer) == 8 for r in records for layer in r["tokens"])


def test_a_single_step_run(tmp_path, capsys):
    train(load_config(None, [*RUN, "train.steps=1", "checkpoint.interval=0"]), tmp_path / "one")
    run = load_run(tmp_path / "one")
    assert run.state == "finished" and run.last_step == 1
    assert dict(overview(run))["progress"] == "step 1 of 1 (100%)"
    page = HtmlPage(render(run))
    assert page.open == [] and page.svgs >= 4
    assert main(["status", str(tmp_path / "one")]) == 0 and "step 1 of 1" in capsys.readouterr().out


def test_status_and_report_of_a_run_that_is_still_going(tmp_path):
    run_dir = tmp_path / "live"
    # in this process group (no elastic agent, whose workers would outlive the kill below)
    sets = ("train.steps=100000", "checkpoint.interval=50", "parallel.max_restarts=0")
    p = subprocess.Popen(
        cli_args(run_dir, *sets), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text().count("\n") >= 20:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run wrote no metrics in 120 s")
        run = load_run(run_dir)  # read while the run appends
        assert run.state == "running" and run.last_step >= 20
        assert dict(overview(run))["progress"].startswith(f"step {run.last_step} of 100000")
        page = HtmlPage(render(run))
        assert page.open == [] and page.svgs == 5
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    deadline = time.time() + 30  # nothing of the run outlives it (the watchdog follows its worker)
    while _processes_of(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_of(run_dir) == []
    snapshot = tmp_path / "snapshot"
    shutil.copytree(run_dir, snapshot)
    with open(snapshot / "metrics.jsonl", "a") as f:
        f.write('{"step": 99999, "ti')  # a line cut short, as a crash leaves it
    later = load_run(snapshot, now=time.time() + 3600)
    assert later.state == "interrupted" and "no run_end" in later.state_detail
    assert later.last_step < 99999


def _processes_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names `run_dir`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(run_dir) in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_stopped_and_failed_runs_say_why(faulty_run, tmp_path):
    stopped = tmp_path / "stopped"
    shutil.copytree(faulty_run, stopped)
    (stopped / "fatal.json").write_text(json.dumps({"error": "GuardStop: step 9: loss spike"}))
    run = load_run(stopped)
    assert (run.state, run.state_detail) == ("stopped", "GuardStop: step 9: loss spike")
    assert 'class="state stopped"' in render(run)


@pytest.mark.parametrize(
    "make, words",
    [(lambda p: p / "missing", "does not exist"), (lambda p: p, "is not a run directory (no events.jsonl)")],
)
def test_not_a_run_is_a_clear_error(tmp_path, capsys, make, words):
    for command in ("report", "status"):
        assert main([command, str(make(tmp_path))]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


def test_running_mean():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert running_mean([2.0], 5) == [2.0]


# -- in a real browser -----------------------------------------------------------------------------


def _browser():
    """A headless chromium through WebDriver, or a skip that says what is missing."""
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them with apt-get)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(driver))


def _errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_report_in_headless_chromium(faulty_run, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By

    report = write_report(faulty_run, tmp_path / "report.html")
    control = tmp_path / "control.html"  # the same checks must see a broken page's errors
    control.write_text(
        '<!doctype html><p>x</p><script>console.error("boom"); missing();</script>'
        '<img src="https://example.invalid/a.png">'
    )
    browser = _browser()
    try:
        browser.get(control.as_uri())
        caught = " ".join(_errors(browser))
        assert "boom" in caught and "missing is not defined" in caught and "example.invalid" in caught

        browser.get(report.resolve().as_uri())
        assert browser.execute_script("return document.readyState") == "complete"
        assert _errors(browser) == []  # no console error, no failed load
        figures = browser.find_elements(By.TAG_NAME, "svg")
        assert len(figures) == 5 and all(f.size["width"] > 300 and f.size["height"] > 150 for f in figures)
        text = browser.find_element(By.TAG_NAME, "body").text
        g = goodput(faulty_run)
        shown = (
            f"{g.ratio:.1%}",
            "nan 1, kill 1",
            "step 30 of 30 (100%)",
            "mtp.0.block (MoE 3 of 3)",
            "crash_detected",
        )
        for key in shown:
            assert key in text, key
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    finally:
        browser.quit()
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    assert image.height > 2000  # the whole page
    small = image.resize((image.width // 4, image.height // 4)).tobytes()
    pixels = [tuple(small[i : i + 3]) for i in range(0, len(small), 3)]
    inked = sum(p != (255, 255, 255) for p in pixels) / len(pixels)
    assert inked > 0.05, f"only {inked:.1%} of the page is not white"
    blue = sum(abs(r - 0x4C) < 40 and abs(g_ - 0x72) < 40 and b > 0x90 for r, g_, b in pixels)
    assert blue > 50  # the plotted lines and timeline dots
