"""Layouts on real processes (gloo): expert parallelism over 2 and 4 ranks and 2 x 2 HSDP
with EP 2 train as one process does (losses, gradient norms, balancing biases), their
checkpoints resume under another layout and export the same Hugging Face files; the
combinations that cannot work are config errors naming the numbers."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CLI_ENV, DEBUG_RUN
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh

from anychip.config import load_config
from anychip.errors import ConfigError
from anychip.export import checkpoint_model, export
from anychip.train.runlog import read_jsonl as lines

STEPS = 10
RUN = [
    *DEBUG_RUN,
    f"train.steps={STEPS}",
    "train.global_batch=8",
    "log.progress=false",
    "checkpoint.interval=5",
    "parallel.max_restarts=0",
]
LAYOUTS = {  # name: (processes, settings)
    "one": (1, []),
    "ep2": (2, ["parallel.ep=2"]),
    "ep4": (4, ["parallel.ep=4"]),
    "ep2_of_4": (4, ["parallel.ep=2"]),  # each EP rank's experts also FSDP-sharded over 2 ranks
    "hsdp_ep2": (4, ["parallel.dp_replicate=2", "parallel.ep=2"]),
}
# what the layout's own run adds (the whole order: checkpointing, compile, EP, FSDP); the losses must not change.
# Under ep2_of_4 the experts' FSDP unit all-gathers inside the selectively checkpointed block.
RUN_ONLY = {
    "ep2": ["train.activation_checkpoint=block", "train.compile=true"],
    "ep2_of_4": ["train.activation_checkpoint=selective"],
}


def cli(run: Path, nproc: int, sets: list[str], resume: bool = False) -> None:
    args = [sys.executable, "-m", "anychip.cli", "train", "--nproc", str(nproc)]
    args += ["--resume", str(run)] if resume else ["--run-dir", str(run)]
    for s in (*([] if resume else RUN), *sets):
        args += ["--set", s]
    r = subprocess.run(args, env=CLI_ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    for name, (nproc, sets) in LAYOUTS.items():
        cli(root / name, nproc, [*sets, *RUN_ONLY.get(name, [])])
    return {name: root / name for name in LAYOUTS}


def metrics(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in lines(run / "metrics.jsonl")}


def biases(run: Path, step: int) -> list[torch.Tensor]:
    model, _ = checkpoint_model(run / "checkpoints" / f"step_{step:08d}")
    return [m.gate.e_score_correction_bias for m in model.moe_layers()]


# the (world size, dp_replicate, dp_shard, ep) each run must have started with
STARTED = {"ep2": (2, 1, 2, 2), "ep4": (4, 1, 4, 4), "ep2_of_4": (4, 1, 4, 2), "hsdp_ep2": (4, 2, 2, 2)}


@pytest.mark.parametrize("layout", STARTED)
def test_a_layout_trains_as_one_process_does(runs, layout):
    start = next(e for e in lines(runs[layout] / "events.jsonl") if e["event"] == "run_start")
    assert tuple(start[k] for k in ("world_size", "dp_replicate", "dp_shard", "ep")) == STARTED[layout]
    added = dict(s.removeprefix("train.").split("=") for s in RUN_ONLY.get(layout, []))
    assert start["activation_checkpoint"] == added.get("activation_checkpoint", "none")
    assert start["compile"] == (added.get("compile") == "true")
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
    # the final model, gathered from the layout's shards and saved in Hugging Face form
    want, have = (
        load_file(runs["one"] / "final" / "model.safetensors"),
        load_file(runs[layout] / "final" / "model.safetensors"),
    )
    assert sorted(have) == sorted(want)
    for name, t in want.items():
        torch.testing.assert_close(have[name], t, rtol=1e-4, atol=1e-5, msg=name)


def _dispatch_worker(rank: int, init_file: str, fallback: bool) -> None:
    from conftest import make_args, make_model

    import anychip.models.deepseek.model as model_module
    from anychip.models.deepseek.expert_parallel import apply_expert_parallel

    torch.set_num_threads(1)
    model_module._USE_GROUPED_MM = not fallback
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = make_model(make_args())  # the same weights on both ranks
        moe = model.layers[1].mlp
        with torch.no_grad():  # every token of both ranks chooses among experts 0-3 (rank 0's)
            moe.gate.e_score_correction_bias[4:] = -1e3
        x = torch.randn(2, 5, model.args.hidden_size, generator=torch.Generator().manual_seed(rank))
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + rank))

        def forward_backward():
            xi = x.clone().requires_grad_(True)
            y = moe(xi)
            (y * g).sum().backward()
            w = moe.experts.gate_up_proj
            grad = w.grad.to_local() if hasattr(w.grad, "to_local") else w.grad
            w.grad = None
            moe.experts.down_proj.grad = None
            return y.detach(), xi.grad, grad

        y_ref, gx_ref, gw_ref = forward_backward()  # this rank's tokens through all 8 local experts
        dist.all_reduce(gw_ref)  # an expert's gradient sums the tokens of both ranks
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
        apply_expert_parallel(model, mesh)
        assert moe.experts.gate_up_proj.to_local().shape[0] == 4  # this rank holds 4 of the 8
        y, gx, gw = forward_backward()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, gw_ref[4 * rank : 4 * rank + 4], rtol=1e-5, atol=1e-6)
        if rank == 1:  # it received no row, and its experts no gradient
            assert gw.abs().sum() == 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fallback", [False, True], ids=["grouped_mm", "per-expert loop"])
def test_the_dispatch_computes_what_one_process_does_even_for_a_rank_without_tokens(tmp_path, fallback):
    """Two ranks, each holding 4 of 8 experts; every token goes to rank 0's experts: outputs and
    gradients equal the computation without expert parallelism, and nobody waits forever."""
    mp.start_processes(_dispatch_worker, args=(str(tmp_path / "init"), fallback), nprocs=2, start_method="spawn")


def _optimizer_worker(rank: int, port: int) -> None:
    from conftest import make_args, make_model

    from anychip.device import get_device
    from anychip.parallel import close_world, init_world, parallelize
    from anychip.train.optim import build_optimizer

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(None, ["device.type=cpu", "parallel.ep=2"])
    device = get_device("cpu")
    world = init_world(device, parallel=cfg.parallel)
    try:
        model = parallelize(make_model(make_args()), world, "fsdp")
        optimizer = build_optimizer(model, cfg.train, device)
        ref = parallelize(make_model(make_args()), world, "fsdp")
        index = {id(p): i for i, p in enumerate(model.parameters())}
        twins = list(ref.parameters())
        groups = [
            {"params": [twins[index[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
            for g in optimizer.param_groups
        ]
        t = cfg.train
        reference = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=False)
        decay = optimizer.param_groups[0]
        assert decay["fused"] and len({p.device_mesh for p in decay["params"]}) == 2  # dense and experts' meshes
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):
            ids = torch.randint(0, model.args.vocab_size, (2, 12), generator=gen)
            for m, opt in ((model, optimizer), (ref, reference)):
                m.loss(ids, ids.roll(-1, dims=1)).loss.backward()
                opt.step()
                opt.zero_grad()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.to_local(), q.to_local(), rtol=1e-5, atol=1e-6)
    finally:
        close_world(world)


def test_fused_adamw_steps_the_dtensors_of_both_meshes_as_the_for_loop_does():
    """FSDP2 + EP 2 on two processes: one fused AdamW over the dense parameters and the experts'
    (another mesh) gives the for-loop's parameters within rounding."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_optimizer_worker, args=(port,), nprocs=2, start_method="spawn")


@pytest.mark.parametrize("layout", STARTED)
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
RESUMES = [("one", "ep2"), ("ep2", "one"), ("ep4", "hsdp_ep2"), ("hsdp_ep2", "ep2")]


@pytest.mark.parametrize("saved, resumed", RESUMES)
def test_a_checkpoint_resumes_under_another_layout(runs, saved, resumed, tmp_path):
    run = tmp_path / f"{saved}_to_{resumed}"
    shutil.copytree(runs[saved], run)
    shutil.rmtree(run / "checkpoints" / f"step_{STEPS:08d}")  # stopped after the checkpoint of step 5
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in lines(run / "metrics.jsonl") if m["step"] <= 5)
    )
    nproc, sets = LAYOUTS[resumed]
    reset = ["parallel.dp_replicate=1", "parallel.ep=1", "train.compile=false", "train.activation_checkpoint=none"]
    cli(run, nproc, [*reset, *sets], resume=True)
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
    ],
)
def test_a_layout_that_cannot_work_is_a_config_error_naming_the_numbers(nproc, sets, words):
    settings = [f"parallel.nproc={nproc}", "model.preset=debug", "train.global_batch=8"]
    load_config(None, [*settings, "parallel.ep=2", "model.n_routed_experts=6"])  # these fit
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, [*settings, *sets])


def test_a_bfloat16_run_on_four_processes_with_ep_2_keeps_the_losses_of_one(tmp_path):
    """bf16 autocast: one process (float32 weights cast by autocast) and 4 (FSDP2 gathering bf16
    parameters, float32 master weights and reduction; experts over EP 2, their all-to-all in
    bf16) compute the same steps up to bf16 rounding; run_start says which dtypes were in force."""
    bf16 = ["train.dtype=bfloat16", "train.steps=3", "checkpoint.interval=0"]
    cli(tmp_path / "one", 1, bf16)
    cli(tmp_path / "four", 4, [*bf16, "parallel.ep=2"])
    one, four = metrics(tmp_path / "one"), metrics(tmp_path / "four")
    assert sorted(one) == sorted(four) == [1, 2, 3]
    for s in one:
        assert four[s]["loss"] == pytest.approx(one[s]["loss"], rel=2e-3), s
        assert four[s]["grad_norm"] == pytest.approx(one[s]["grad_norm"], rel=2e-2), s
    assert four[1]["loss"] != one[1]["loss"] or four[2]["loss"] != one[2]["loss"]  # bf16 parameters: not bit-equal
    start = [e for e in lines(tmp_path / "four" / "events.jsonl") if e["event"] == "run_start"][-1]
    assert (start["compute_dtype"], start["param_dtype"], start["reduce_dtype"]) == ("bfloat16",) * 2 + ("float32",)
    assert start["master_dtype"] == "float32" and len(start["build_peak_bytes"]) == 4
    start = [e for e in lines(tmp_path / "one" / "events.jsonl") if e["event"] == "run_start"][-1]
    assert (start["compute_dtype"], start["param_dtype"]) == ("bfloat16", "float32")
