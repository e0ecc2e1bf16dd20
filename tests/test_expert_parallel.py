"""Layouts on real processes (gloo): expert parallelism over 2 and 4 ranks and 2 x 2 HSDP
with EP 2 train as one process does (losses, gradient norms, balancing biases), their
checkpoints resume under another layout and export the same Hugging Face files; the
combinations that cannot work are config errors naming the numbers."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anychip.config import load_config
from anychip.dcp_reader import read_metadata
from anychip.errors import ConfigError
from anychip.export import checkpoint_model, export
from anychip.train.runlog import read_jsonl as lines

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 10
RUN = [
    "model.preset=debug",
    f"train.steps={STEPS}",
    "train.global_batch=8",
    "train.seq_len=48",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "log.progress=false",
    "device.type=cpu",
    "checkpoint.interval=5",
    "parallel.max_restarts=0",
]
LAYOUTS = {  # name: (processes, settings)
    "one": (1, []),
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "hsdp_ep2": (4, ["parallel.dp_replicate=2", "parallel.ep=2"]),
}
EXPERT_PARAM = "layers.1.mlp.experts.gate_up_proj"


def cli(run: Path, nproc: int, sets: list[str], resume: bool = False) -> None:
    args = [sys.executable, "-m", "anychip.cli", "train", "--nproc", str(nproc)]
    args += ["--resume", str(run)] if resume else ["--run-dir", str(run)]
    for s in (*([] if resume else RUN), *sets):
        args += ["--set", s]
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    for name, (nproc, sets) in LAYOUTS.items():
        cli(root / name, nproc, sets)
    return {name: root / name for name in LAYOUTS}


def metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in lines(run / "metrics.jsonl")}


def biases(run: Path, step: int) -> list[torch.Tensor]:
    model, _ = checkpoint_model(run / "checkpoints" / f"step_{step:08d}")
    return [m.gate.e_score_correction_bias for m in model.moe_layers()]


@pytest.mark.parametrize("layout", ["ep2", "ep4", "hsdp_ep2"])
def test_a_layout_trains_as_one_process_does(runs, layout):
    start = next(e for e in lines(runs[layout] / "events.jsonl") if e["event"] == "run_start")
    nproc, _ = LAYOUTS[layout]
    replicate = 2 if layout == "hsdp_ep2" else 1
    assert (start["world_size"], start["dp_replicate"], start["ep"]) == (
        nproc,
        replicate,
        2 if replicate == 2 else nproc,
    )
    ref, got = metrics(runs["one"]), metrics(runs[layout])
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), s
    # the auxiliary-loss-free balancing saw the loads of all ranks: the same biases, moved from zero
    for step in (5, STEPS):
        for want, have in zip(biases(runs["one"], step), biases(runs[layout], step), strict=True):
            assert want.abs().sum() > 0
            assert torch.equal(want, have)


@pytest.mark.parametrize("layout", ["ep2", "ep4", "hsdp_ep2"])
def test_the_experts_are_written_by_the_ranks_that_hold_them(runs, layout):
    """The checkpoint holds the stacked experts in blocks of N_r / ep whole experts, one per
    EP rank: the experts were sharded, not replicated (1 process: one block)."""
    directory = runs[layout] / "checkpoints" / f"step_{STEPS:08d}"
    meta = read_metadata(directory).state_dict_metadata[f"model.{EXPERT_PARAM}"]
    n_experts = meta.size[0]
    ep = 4 if layout == "ep4" else 2
    assert sorted(c.offsets[0] for c in meta.chunks) == [i * n_experts // ep for i in range(ep)]
    for c in meta.chunks:
        assert c.sizes[0] == n_experts // ep and tuple(c.sizes[1:]) == tuple(meta.size[1:])
        assert tuple(c.offsets[1:]) == (0,) * (len(meta.size) - 1)
    one = read_metadata(runs["one"] / "checkpoints" / f"step_{STEPS:08d}").state_dict_metadata
    assert [tuple(c.sizes) for c in one[f"model.{EXPERT_PARAM}"].chunks] == [tuple(meta.size)]


@pytest.mark.parametrize("layout", ["ep2", "ep4", "hsdp_ep2"])
def test_export_of_any_layout_gives_the_same_hugging_face_files(runs, layout, tmp_path):
    ref = export(runs["one"], tmp_path / "one", step=STEPS)
    got = export(runs[layout], tmp_path / layout, step=STEPS)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert (got / "config.json").read_text() == (ref / "config.json").read_text()
    want, have = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert sorted(have) == sorted(want)
    for name, t in want.items():
        assert have[name].dtype == t.dtype and have[name].shape == t.shape, name
        torch.testing.assert_close(have[name], t, rtol=1e-4, atol=1e-5, msg=name)


# a checkpoint saved under every layout, resumed under another (the experts resharded)
RESUMES = [("one", "ep2"), ("ep2", "one"), ("ep4", "hsdp_ep2"), ("hsdp_ep2", "ep4")]


@pytest.mark.parametrize("saved, resumed", RESUMES)
def test_a_checkpoint_resumes_under_another_layout(runs, saved, resumed, tmp_path):
    run = tmp_path / f"{saved}_to_{resumed}"
    shutil.copytree(runs[saved], run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")  # stopped after the checkpoint of step 5
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in lines(run / "metrics.jsonl") if m["step"] <= 5)
    )
    nproc, sets = LAYOUTS[resumed]
    cli(run, nproc, ["parallel.dp_replicate=1", "parallel.ep=1", *sets], resume=True)
    load = [e for e in lines(run / "events.jsonl") if e["event"] == "checkpoint_load"][-1]
    assert load["step"] == 5 and load["saved_world_size"] == LAYOUTS[saved][0]
    ref, got = metrics(runs["one"]), metrics(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(6, STEPS + 1):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-5), s
    for want, have in zip(biases(runs["one"], STEPS), biases(run, STEPS), strict=True):
        assert torch.equal(want, have)


@pytest.mark.parametrize(
    "nproc, sets, words",
    [
        (4, ["parallel.ep=3"], "parallel.ep = 3 must divide parallel.dp_shard = 4"),
        (4, ["parallel.dp_replicate=3"], "parallel.dp_replicate = 3 does not divide the world size 4"),
        (4, ["parallel.dp_replicate=2", "parallel.dp_shard=4"], "2 x 4 = 8 ranks, but the world size is 4"),
        (4, ["parallel.dp_replicate=2", "parallel.ep=4"], "parallel.ep = 4 must divide parallel.dp_shard = 2"),
        (4, ["parallel.ep=4", "model.n_routed_experts=6"], "parallel.ep = 4 must divide the model's 6 routed experts"),
        (2, ["parallel.ep=2", "parallel.strategy=ddp"], "parallel.ep = 2 need parallel.strategy = 'fsdp'"),
        (2, ["parallel.ep=2", "train.activation_checkpoint=selective"], '"none" or "block" with parallel.ep > 1'),
    ],
)
def test_a_layout_that_cannot_work_is_a_config_error_naming_the_numbers(nproc, sets, words):
    settings = [f"parallel.nproc={nproc}", "model.preset=debug", "train.global_batch=8"]
    load_config(None, [*settings, "parallel.ep=2", "model.n_routed_experts=6"])  # these fit
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, [*settings, *sets])
