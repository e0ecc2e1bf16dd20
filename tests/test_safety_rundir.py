"""A run directory from elsewhere is not trusted: a symbolic link where anychip keeps its files makes
it refuse, naming the path, and nothing outside is written, renamed or deleted; a directory that holds
a run is never a new run's; --resume compares with the config its checkpoint was saved with."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DEBUG_RUN

import anychip.report.page as page_module
from anychip.checkpoint import Checkpointer, saved_config, write_manifest
from anychip.cli import main
from anychip.config import load_config
from anychip.errors import CheckpointError
from anychip.report.page import write_report
from anychip.runfiles import UnsafePath, remove_file, write_file
from anychip.train.loop import train
from anychip.train.runlog import read_jsonl

RUN = [*DEBUG_RUN, "train.steps=1", "train.global_batch=2", "checkpoint.interval=1", "eval.interval=0"]
CLI = [a for s in RUN for a in ("--set", s)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished one-step run: config.toml, events.jsonl, final/ and the checkpoint of step 1."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(None, RUN), run)
    return run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run, and beside it a user's file that must stay as it is."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy, symlinks=True)
    (tmp_path / "victim.txt").write_text("the user's own file\n")
    return copy


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (but the lock, which a refused job takes too): a tree to
    compare before and after."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"
    }


def anychip(*argv: str, capsys) -> tuple[int, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out + out.err


# -- links in a run directory ---------------------------------------------------------------------------


def test_report_writes_through_no_link_and_refuses_a_linked_page(run, tmp_path, monkeypatch):
    monkeypatch.setattr(page_module, "render", lambda run: "<html>the page</html>")  # the write, not the plots
    victim = tmp_path / "victim.txt"
    (run / "report.html.tmp").symlink_to(victim)  # a planted "temporary"
    page = write_report(run)
    assert victim.read_text() == "the user's own file\n"
    assert page.is_file() and not page.is_symlink() and "<html" in page.read_text()
    page.unlink()
    page.symlink_to(victim)
    with pytest.raises(UnsafePath, match=f"{page} is a symbolic link"):
        write_report(run)
    assert victim.read_text() == "the user's own file\n" and page.is_symlink()


def test_resume_with_launch_toml_a_link_is_refused_naming_it(run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    (run / "launch.toml").symlink_to(victim)
    before = len(read_jsonl(run / "events.jsonl"))
    rc, out = anychip("train", "--resume", str(run), "--set", "parallel.max_restarts=1", capsys=capsys)
    assert rc == 2 and f"{run / 'launch.toml'} is a symbolic link" in out, out
    assert victim.read_text() == "the user's own file\n"
    assert len(read_jsonl(run / "events.jsonl")) == before  # refused before anything was written


def test_a_linked_checkpoints_directory_is_refused_and_what_it_points_to_is_untouched(tmp_path):
    mine = tmp_path / "my-project"
    for name in ("build.tmp", "step_00000003", "step_00000004.tmp"):
        (mine / name).mkdir(parents=True)
        (mine / name / "keep.txt").write_text(name)
    before = files(mine)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").symlink_to(mine)
    with pytest.raises(UnsafePath, match=f"{run / 'checkpoints'} is a symbolic link"):
        train(load_config(None, RUN), run)
    assert files(mine) == before  # nothing deleted, nothing renamed corrupt_*


def test_cleanup_deletes_only_the_leftovers_of_its_own_saves(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    for name in ("step_00000002.tmp", "build.tmp", "step_x.tmp", "step_00000001"):
        (root / name).mkdir(parents=True)
    (root / "notes.tmp").write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (root / "step_00000005.tmp").symlink_to(outside)  # a link with the right name is not a leftover either
    events = []
    log = SimpleNamespace(event=lambda kind, **f: events.append((kind, f)))
    state = SimpleNamespace(
        world=SimpleNamespace(distributed=False, is_main=True), log=log, device=SimpleNamespace(type="cpu")
    )
    Checkpointer(state, root).cleanup()
    assert sorted(p.name for p in root.iterdir()) == [
        "build.tmp", "notes.tmp", "step_00000001", "step_00000005.tmp", "step_x.tmp",
    ]  # fmt: skip
    assert (outside / "keep.txt").read_text() == "mine"
    assert events == [("checkpoint_cleanup", {"path": str(root / "step_00000002.tmp")})]


def test_the_writers_follow_no_link_to_a_file_or_a_directory(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("mine")
    (tmp_path / "elsewhere").mkdir()
    (run / "heartbeat").symlink_to(tmp_path / "elsewhere")
    (run / "fatal.json").symlink_to(victim)
    with pytest.raises(UnsafePath, match=f"{run / 'heartbeat'} is a symbolic link"):
        write_file(run, "heartbeat/rank0.json", "{}")
    with pytest.raises(UnsafePath, match=f"{run / 'fatal.json'} is a symbolic link"):
        write_file(run, "fatal.json", "{}")
    with pytest.raises(UnsafePath, match=f"{run / 'fatal.json'} is a symbolic link"):
        remove_file(run, "fatal.json")
    assert victim.read_text() == "mine" and list((tmp_path / "elsewhere").iterdir()) == []
    assert write_file(run, "stacks/x.json", "{}").read_text() == "{}"
    assert sorted(p.name for p in (run / "stacks").iterdir()) == ["x.json"]  # its temporary renamed, none left


# -- a directory that holds a run ------------------------------------------------------------------------


def test_a_new_run_in_a_finished_run_without_checkpoints_is_refused_and_changes_nothing(run, capsys):
    shutil.rmtree(run / "checkpoints")  # as a run with checkpoint.interval = 0 leaves it
    before = files(run)
    rc, out = anychip("train", "--run-dir", str(run), *CLI, "--set", "checkpoint.interval=0", capsys=capsys)
    assert rc == 2, out
    assert f"{run} already holds a run (config.toml, events.jsonl, final/)" in out and "--resume" in out
    assert files(run) == before  # final/, config.toml and events.jsonl as they were


# -- --resume compares with the checkpoint ---------------------------------------------------------------


def test_resume_after_editing_the_run_config_names_the_key_against_the_checkpoint(run, capsys):
    config = run / "config.toml"
    config.write_text(config.read_text().replace("seed = 0\n", "seed = 5\n", 1))
    events = len(read_jsonl(run / "events.jsonl"))
    rc, out = anychip("train", "--resume", str(run), "--set", "train.steps=2", capsys=capsys)
    assert rc == 2 and "train.seed (run: 0, now: 5)" in out, out
    assert f"the config of its checkpoint, {run / 'checkpoints' / 'step_00000001' / 'config.toml'}" in out
    assert "train.steps" not in out.split("differ from")[1]  # a resume may train longer
    assert len(read_jsonl(run / "events.jsonl")) == events
    # without a checkpoint there is nothing else to compare with: it says so
    shutil.rmtree(run / "checkpoints")
    rc, out = anychip("train", "--resume", str(run), "--set", "train.seq_len=32", capsys=capsys)
    assert rc == 2 and f"differ from {config} (no checkpoint yet" in out and "train.seq_len (run: 48" in out, out


def test_a_checkpoint_config_edited_after_the_save_is_refused_naming_it(finished, tmp_path):
    root = tmp_path / "checkpoints"
    shutil.copytree(finished / "checkpoints", root)
    step = root / "step_00000001"
    assert saved_config(root) == step / "config.toml"
    (step / "config.toml").write_text((step / "config.toml").read_text().replace("seed = 0\n", "seed = 5\n", 1))
    write_manifest(step)  # even with its manifest made to match
    with pytest.raises(CheckpointError, match=f"{step / 'config.toml'} is not the config this checkpoint was saved"):
        saved_config(root)
    assert json.loads((step / "meta.json").read_text())["config_digest"]
