"""Exports never delete what anychip did not write; Hugging Face directories as people have
them (transformers' save_pretrained, sharded files) load exactly or fail naming the tensor."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_args, make_model, transformers_deepseek
from safetensors.torch import load_file, save_file

from anychip.checkpoint import committed
from anychip.cli import main as cli
from anychip.config import load_config
from anychip.errors import CheckpointError
from anychip.export import checkpoint_model, export
from anychip.models import load_hf, save_hf
from anychip.models.hf import remove_save_leftovers
from anychip.train.loop import train

RUN = [
    "model.preset=debug",
    "train.steps=2",
    "train.global_batch=2",
    "train.seq_len=16",
    "train.warmup_steps=1",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "device.type=cpu",
    "checkpoint.interval=1",
    "checkpoint.keep=3",
    "parallel.max_restarts=0",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished two-step run with checkpoints of steps 0, 1 and 2 and a final/ export."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, RUN), run)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "runs" / "a"))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its contents."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_aimed_at_the_run_its_parent_or_its_checkpoints_is_refused_and_deletes_nothing(run, capsys):
    before = snapshot(run.parent)
    (run.parent.parent / "link").symlink_to(run)
    for out, reason in [
        (run, "is the run being exported"),
        (run.parent, "contains the run being exported"),
        (run.parent.parent / "link", "is the run being exported"),
        (run / "checkpoints" / "hf", "checkpoints directory"),
    ]:
        with pytest.raises(FileExistsError, match=reason):
            export(run, out, overwrite=True)
    with pytest.raises(FileExistsError, match="is the run being exported"):
        save_hf(make_model(make_args()), run, overwrite=True, protect=run)
    assert cli(["export", str(run), "--out", str(run), "--overwrite"]) == 2  # the command from the issue
    assert "refusing to write a model here" in capsys.readouterr().err
    assert snapshot(run.parent) == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["a"]  # no temporary leftovers either


def test_overwrite_refuses_a_directory_holding_a_strangers_file_and_keeps_it(tmp_path):
    model = make_model(make_args())
    for stranger in ["notes.txt", "model.safetensors.bak", "data/"]:
        out = tmp_path / stranger.strip("/").replace(".", "_")
        save_hf(model, out)
        if stranger.endswith("/"):
            (out / stranger).mkdir()
            (out / stranger / "x.bin").write_bytes(b"precious")
        else:
            (out / stranger).write_text("precious")
        before = snapshot(out)
        with pytest.raises(FileExistsError, match=f"{out}.*{stranger.strip('/')!r}"):
            save_hf(model, out, overwrite=True)
        assert snapshot(out) == before


def test_home_working_directory_and_root_are_never_replaced_even_when_they_hold_only_an_export(tmp_path, monkeypatch):
    model = make_model(make_args())
    home, work = save_hf(model, tmp_path / "home"), save_hf(model, tmp_path / "work")
    before = snapshot(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out, reason in [
        (home, "is the home directory"),
        (work, "is the current working directory"),
        (Path("."), "is the current working directory"),
        (tmp_path, "contains the home directory"),
        (Path("/"), "is the filesystem root"),
    ]:
        with pytest.raises(FileExistsError, match=reason):
            save_hf(model, out, overwrite=True)
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_previous_export_and_final_is_rewritten_at_each_run_end(run, tmp_path):
    out = tmp_path / "hf"
    export(run, out, step=1)
    (out / "generation_config.json").write_text("{}")  # what transformers writes beside an export
    sharded = make_model(make_args(), seed=3)
    save_hf(sharded, out, max_shard_bytes=20_000, overwrite=True)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    path = export(run, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["anychip_export.json", "config.json", "model.safetensors"]
    assert json.loads((path / "anychip_export.json").read_text())["step"] == 2
    model, _ = checkpoint_model(run / "checkpoints" / "step_00000002")
    assert torch.equal(load_hf(out).norm.weight, model.norm.weight)
    train(load_config(run / "config.toml", ["train.steps=3"]), run)  # the loop saves final/ again
    assert torch.equal(
        load_hf(run / "final").norm.weight, checkpoint_model(committed(run / "checkpoints")[0])[0].norm.weight
    )


def test_leftovers_of_an_interrupted_save_are_removed_and_nothing_else(tmp_path):
    final = save_hf(make_model(make_args()), tmp_path / "final")
    leftovers = [tmp_path / ".final.tmp-k2j3", tmp_path / ".final.old-4242"]
    kept = [tmp_path / ".finalx.tmp-1", tmp_path / ".other.old-7", tmp_path / "final.old-1"]
    for d in leftovers + kept:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    (tmp_path / ".final.tmp-file").write_text("a file, not a save's directory")
    assert remove_save_leftovers(final) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["final", ".final.tmp-file", *(d.name for d in kept)])
    assert (final / "model.safetensors").is_file()
    assert remove_save_leftovers(final) == []
    assert remove_save_leftovers(tmp_path / "missing" / "final") == []


def test_transformers_save_pretrained_directory_loads_exactly_with_fresh_deterministic_mtp(tmp_path):
    peer = transformers_deepseek(tmp_path / "peer", num_nextn_predict_layers=1)
    assert json.loads((tmp_path / "peer" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with pytest.warns(UserWarning, match=f"{tmp_path / 'peer'}.*no MTP tensor"):
        ours = load_hf(tmp_path / "peer").eval()
    x = torch.randint(0, 80, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(x) - peer(x).logits).abs().max().item() < 1e-4
    assert ours.mtp_initialized and len(ours.mtp) == 1
    mtp = ours.mtp[0].state_dict()
    assert all(torch.isfinite(t).all() for t in mtp.values())
    assert torch.equal(mtp["enorm.weight"], torch.ones(32)) and not mtp["block.mlp.gate.e_score_correction_bias"].any()
    assert 0.01 < mtp["eh_proj.weight"].std().item() < 0.03  # Normal(0, initializer_range = 0.02)
    with pytest.warns(UserWarning):
        again = load_hf(tmp_path / "peer").mtp[0].state_dict()
    assert all(torch.equal(again[k], v) for k, v in mtp.items())  # the same fresh weights every time
    labels = torch.randint(0, 80, (2, 19))
    assert torch.isfinite(ours.train()(x, labels=labels).loss)  # the MTP loss trains from there


def test_mtp_drop_builds_no_mtp_modules_and_mtp_require_insists_on_them(tmp_path):
    peer = transformers_deepseek(tmp_path / "peer", num_nextn_predict_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = load_hf(tmp_path / "peer", mtp="drop").eval()
    assert len(ours.mtp) == 0 and ours.args.num_nextn_predict_layers == 0 and not ours.mtp_initialized
    assert not any(k.startswith("mtp.") for k in ours.state_dict())
    x = torch.randint(0, 80, (2, 11))
    with torch.no_grad():
        assert (ours(x) - peer(x).logits).abs().max().item() < 1e-4
    with pytest.raises(CheckpointError, match=r"'model\.layers\.3\..*'mtp\.0\..*is missing"):
        load_hf(tmp_path / "peer", mtp="require")
    with pytest.raises(ValueError, match="mtp='none'"):
        load_hf(tmp_path / "peer", mtp="none")


def test_a_complete_mtp_loads_exactly_and_a_partial_one_is_an_error_naming_the_missing_tensor(tmp_path):
    model = make_model(make_args(num_nextn_predict_layers=1))
    path = save_hf(model, tmp_path / "hf")
    loaded = load_hf(path)
    assert not loaded.mtp_initialized
    assert all(torch.equal(v, model.mtp.state_dict()[k]) for k, v in loaded.mtp.state_dict().items())
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.3.eh_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.3\.eh_proj\.weight' \(anychip 'mtp\.0\.eh_proj"):
        load_hf(path)
    assert load_hf(path, mtp="drop").args.num_nextn_predict_layers == 0  # MTP tensors are ignored then


def test_sharded_directory_with_one_expert_twice_and_another_missing_is_an_error_naming_it(tmp_path):
    path = save_hf(make_model(make_args()), tmp_path / "hf", max_shard_bytes=4_000)
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    # two slices of the same stacked anychip tensor layers.1.mlp.experts.down_proj, in different shards
    twice, gone = "model.layers.1.mlp.experts.0.down_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight"
    assert weight_map[twice] != weight_map[gone]
    shard = path / weight_map[gone]
    tensors = load_file(shard)
    tensors[twice] = tensors.pop(gone)  # same shape: the per-tensor value count still adds up
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"{twice!r} is given more than once"):
        load_hf(path)
    del tensors[twice]
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"{gone!r} \\(anychip 'layers.1.mlp.experts.down_proj', expert 7\\)"):
        load_hf(path)


def test_export_without_a_step_uses_the_newest_checkpoint_that_verifies(run, tmp_path):
    newest, second, oldest = committed(run / "checkpoints")
    f = next(newest.glob("*.distcp"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.warns(UserWarning, match=f"using {second.name}, skipped .*{newest.name}: .*truncated"):
        path = export(run, tmp_path / "hf")
    assert json.loads((path / "anychip_export.json").read_text())["step"] == 1
    model, _ = checkpoint_model(second)
    for k, v in load_hf(path).state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert newest.is_dir() and f.is_file()  # exporting inspects, it moves nothing
    with pytest.raises(CheckpointError, match=f"{newest.name}.*truncated"):
        export(run, tmp_path / "hf2", step=2)
    for d in (second, oldest):
        (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        export(run, tmp_path / "hf3")
    assert not (tmp_path / "hf2").exists() and not (tmp_path / "hf3").exists()
