"""Saving streams: a .safetensors file is written tensor by tensor with the bytes
safetensors' own save_file writes; save_hf (of a plain model, or of an FSDP2 / expert-parallel
one from its shards) and anychip export write the files the whole converted model would give,
holding one tensor of the model at a time."""

import json
import os
import random
import shutil
import socket
import weakref
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_args, make_model
from safetensors.torch import save_file

import anychip.export as export_module
from anychip.config import load_config
from anychip.device import get_device
from anychip.errors import CheckpointError
from anychip.export import checkpoint_model, checkpoint_reader, checkpoint_tensors, export
from anychip.models import save_hf
from anychip.models.deepseek.state_dict_adapter import to_hf
from anychip.models.hf import hf_config_from_args, save_hf_streamed
from anychip.models.safetensors_stream import DTYPES, SafetensorsWriter, layout
from anychip.parallel import close_world, init_world, parallelize
from anychip.train.loop import train

RUN = [
    "model.preset=debug",
    "train.steps=1",
    "train.global_batch=2",
    "train.seq_len=16",
    "train.warmup_steps=0",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "device.type=cpu",
    "checkpoint.interval=1",
    "parallel.max_restarts=0",
]


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def reference(model, out: Path, dtype=None, max_shard_bytes: int = 5 * 2**30) -> dict[str, bytes]:
    """The directory of the whole model converted at once: every Hub tensor cast (router and
    balancing bias in float32), files cut in to_hf order when the next tensor would not fit,
    each written by safetensors' save_file."""
    dtype = dtype or model.embed_tokens.weight.dtype
    tensors = [
        (k, t.to(torch.float32 if k.endswith(("e_score_correction_bias", "mlp.gate.weight")) else dtype))
        for k, t in to_hf(model.args, model.state_dict())
    ]
    shards, size = [[]], 0
    for k, t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append((k, t))
        size += t.nbytes
    out.mkdir()
    n, weight_map = len(shards), {}
    for i, shard in enumerate(shards, start=1):
        name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: t.contiguous() for k, t in shard}, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k, _ in shard})
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for _, t in tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config_from_args(model.args, dtype), indent=2) + "\n")
    return files(out)


def random_tensors(rng: random.Random) -> dict[str, torch.Tensor]:
    """Up to 10 tensors of any dtype safetensors stores, shapes with zeros and scalars among
    them, names that sort differently as text and as numbers or that are not ASCII."""
    tensors = {}
    for _ in range(rng.randint(0, 10)):
        dtype = rng.choice(list(DTYPES))
        shape = [rng.randint(0, 5) for _ in range(rng.randint(0, 3))]
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (torch.Size(shape).numel() * dtype.itemsize,))
        raw = raw.to(torch.uint8)  # any bit pattern, but a bool must be 0 or 1
        name = rng.choice(["layers.", "layers.1", "Z", "é", "a b", "model.layers.10.", "model.layers.9."])
        tensors[name + str(rng.randint(0, 20))] = raw.view(dtype).reshape(shape)
    return tensors


def test_a_file_written_tensor_by_tensor_in_any_order_is_byte_for_byte_save_files(tmp_path):
    rng = random.Random(0)
    for trial in range(300):
        tensors = random_tensors(rng)
        metadata = rng.choice([{"format": "pt"}, None])
        save_file(tensors, tmp_path / "want", metadata=metadata)
        order = list(tensors.items())
        rng.shuffle(order)
        with SafetensorsWriter(tmp_path / "got", [(k, t.shape, t.dtype) for k, t in tensors.items()], metadata) as f:
            for k, t in order:
                f.write(k, t.t().contiguous().t() if t.dim() == 2 else t)  # other strides, the same values
        assert (tmp_path / "got").read_bytes() == (tmp_path / "want").read_bytes(), (trial, list(tensors))


def test_the_writer_checks_each_tensor_and_that_none_is_missing(tmp_path):
    specs = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    f = SafetensorsWriter(tmp_path / "x", specs)
    with pytest.raises(ValueError, match=r"'a' is torch.float16 \(2, 3\); declared torch.float32 \(2, 3\)"):
        f.write("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="'c' is not one of"):
        f.write("c", torch.zeros(1))
    f.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="'a' written twice"):
        f.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"incomplete, 1 tensor\(s\) never written: \['b'\]"):
        f.close()
    with pytest.raises(ValueError, match="'q'.*cannot be stored"):
        layout([("q", (1,), torch.complex128)])


@pytest.mark.parametrize(
    "overrides, dtype, max_shard_bytes",
    [({}, None, 5 * 2**30), ({}, torch.bfloat16, 20_000), ({"tie_word_embeddings": True}, torch.float16, 9_000)],
    ids=["float32_one_file", "bfloat16_sharded", "tied_float16_sharded"],
)
def test_save_hf_writes_the_files_of_the_whole_converted_model(tmp_path, overrides, dtype, max_shard_bytes):
    model = make_model(make_args(**overrides))
    want = reference(model, tmp_path / "want", dtype, max_shard_bytes)
    got = save_hf(model, tmp_path / "got", dtype=dtype, max_shard_bytes=max_shard_bytes)
    assert files(got) == want
    if max_shard_bytes < 5 * 2**30:  # files cut inside a stacked expert tensor: written across two files
        assert len(want) > 3


def test_each_tensor_is_fetched_once_in_order_and_dropped_before_the_next(tmp_path):
    model = make_model(make_args())
    state = model.state_dict()
    tensors = [(k, t.shape, t.dtype) for k, t in state.items()]
    fetched: list[str] = []
    last = None

    def fetch(name):
        nonlocal last
        assert last is None or last() is None, f"{fetched[-1]} still held when {name} is fetched"
        fetched.append(name)
        t = state[name].clone()  # a tensor of its own, as a gather or a checkpoint read gives
        last = weakref.ref(t)
        return t

    save_hf_streamed(model.args, tensors, fetch, tmp_path / "hf", max_shard_bytes=20_000)
    assert fetched == list(state)
    assert files(tmp_path / "hf") == reference(model, tmp_path / "want", max_shard_bytes=20_000)
    # a rank that does not write fetches the same tensors in the same order and touches nothing
    fetched.clear()
    last = None
    assert save_hf_streamed(model.args, tensors, fetch, tmp_path / "none", writer=False) == tmp_path / "none"
    assert fetched == list(state) and not (tmp_path / "none").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded_save_worker(rank: int, port: int, sets: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = init_world(get_device("cpu"), parallel=load_config(None, ["device.type=cpu", *sets]).parallel)
    try:
        model = parallelize(make_model(make_args()), world, "fsdp")  # the same weights on both ranks, then sharded
        assert hasattr(model.layers[1].mlp.experts.gate_up_proj, "full_tensor")
        save_hf(model, out, max_shard_bytes=20_000, writer=world.is_main)
    finally:
        close_world(world)


@pytest.mark.parametrize("sets", [[], ["parallel.ep=2"]], ids=["fsdp2", "ep2"])
def test_a_sharded_model_is_saved_from_its_shards_by_all_ranks_and_written_by_one(tmp_path, sets):
    want = reference(make_model(make_args()), tmp_path / "want", max_shard_bytes=20_000)
    out = tmp_path / "got"
    mp.start_processes(_sharded_save_worker, args=(_free_port(), sets, str(out)), nprocs=2, start_method="spawn")
    assert files(out) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["got", "want"]  # no second writer, no leftovers


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config(None, RUN), run)
    shutil.rmtree(run / "final")
    return run


def test_export_writes_the_files_of_the_loaded_checkpoint(trained, tmp_path):
    model, meta = checkpoint_model(trained / "checkpoints" / "step_00000001")
    want = reference(model, tmp_path / "want")
    got = export(trained, tmp_path / "got")
    assert json.loads((got / "anychip_export.json").read_text()) == {"run": str(trained), "step": meta["step"]}
    assert {k: v for k, v in files(got).items() if k != "anychip_export.json"} == want


def test_export_reads_the_checkpoint_a_bounded_group_at_a_time(trained, tmp_path, monkeypatch):
    directory = trained / "checkpoints" / "step_00000001"
    model, _ = checkpoint_model(directory)
    tensors = checkpoint_tensors(directory, model.args)
    sizes = {name: torch.Size(shape).numel() * dtype.itemsize for name, shape, dtype in tensors}
    loads, load = [], export_module.safe_load

    def recording(state, *a, **k):
        loads.append(list(state["model"]))
        return load(state, *a, **k)

    monkeypatch.setattr(export_module, "safe_load", recording)
    bound = 3 * max(sizes.values())
    fetch = checkpoint_reader(directory, tensors, group_bytes=bound)
    for name, _, _ in tensors:
        assert torch.equal(fetch(name), model.state_dict()[name]), name
    assert [n for group in loads for n in group] == [n for n, _, _ in tensors]  # each tensor read once, in order
    assert 1 < len(loads) < len(tensors)
    assert all(sum(sizes[n] for n in group) <= bound for group in loads)
    # the whole export with one tensor per read still writes the same files
    monkeypatch.setattr(export_module, "READ_BYTES", 0)
    loads.clear()
    export(trained, tmp_path / "one_by_one")
    assert len(loads) == len(tensors)
    assert files(tmp_path / "one_by_one") == files(export(trained, tmp_path / "grouped"))


def test_export_names_a_tensor_the_checkpoint_lacks_or_shapes_differently(trained, tmp_path):
    directory = trained / "checkpoints" / "step_00000001"
    args = checkpoint_model(directory)[0].args
    with pytest.raises(CheckpointError, match=r"model.embed_tokens.weight has shape \(\d+, \d+\); its meta.json"):
        checkpoint_tensors(directory, args.replace(vocab_size=args.vocab_size + 1))
    with pytest.raises(CheckpointError, match="holds no tensor model.mtp.1"):
        checkpoint_tensors(directory, args.replace(num_nextn_predict_layers=args.num_nextn_predict_layers + 1))
