"""A model is built on the meta device, laid out, and only each rank's shards are ever
materialised (anychip.train.shards): random init gives the full tensors one process gives,
whatever the layout (FSDP2 on 2 ranks; 4 ranks with the experts over EP 2, each expert
FSDP-sharded over 2), while no rank creates a tensor larger than its largest shard; a
Hugging Face directory loads into the shards, reading only their rows; a bad tensor that
only one rank reads is an error on every rank, not a hang."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_args, make_model
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import anychip.models.deepseek.init as init
from anychip.config import load_config
from anychip.device import get_device
from anychip.errors import CheckpointError
from anychip.models import DeepSeekV3, load_hf, save_hf
from anychip.models.deepseek.init import block_rows
from anychip.parallel import close_world, init_world, parallelize
from anychip.train.shards import materialize

BLOCK = 64  # elements: blocks of 2 rows of the test model's 32-wide matrices, so that blocks are smaller than shards


class Allocations(TorchDispatchMode):
    """The largest tensor any op creates on this rank, in elements (of a DTensor: its local part)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views (and safetensors' tensors on its file mapping) share an input's storage: no new memory
        inputs = {_storage(a) for a in torch.utils._pytree.tree_leaves((args, kwargs))}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _storage(t) not in inputs:
                local = t.to_local() if hasattr(t, "to_local") else t
                self.largest = max(self.largest, local.numel())
        return out


def _storage(x):
    if isinstance(x, torch.UntypedStorage):
        return x.data_ptr()
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        local = x.to_local() if hasattr(x, "to_local") else x
        return local.untyped_storage().data_ptr()
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, sets: list[str], hf_dir: str, bad_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    init.BLOCK_ELEMENTS = BLOCK
    device = get_device("cpu")
    world = init_world(device, parallel=load_config(None, ["device.type=cpu", *sets]).parallel)
    try:
        args = make_args()
        whole = DeepSeekV3(args)
        whole.init_weights(seed=3)

        def sharded():
            with torch.device("meta"):
                model = DeepSeekV3(args)
            return parallelize(model, world, "fsdp")

        model = sharded()
        with Allocations() as seen:
            materialize(model, None, 3, device, world)
        shards = [p.to_local().numel() for p in model.parameters()]
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        for name, p in whole.named_parameters():
            assert torch.equal(full[name], p), name  # the values do not depend on the layout
        assert seen.largest <= max(shards), (seen.largest, max(shards))
        # every expert stack is sharded: no rank ever created one whole
        stack = whole.layers[1].mlp.experts.gate_up_proj.numel()
        assert seen.largest < stack

        loaded = sharded()
        with Allocations() as read:
            materialize(loaded, ("hf", hf_dir), 0, device, world)
        reference = load_hf(hf_dir)  # the whole model, in one process
        for name, p in loaded.named_parameters():
            assert torch.equal(p.full_tensor(), reference.state_dict()[name]), name
        for a, b in zip(loaded.moe_layers(), reference.moe_layers()):
            assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
        assert read.largest <= max(shards), (read.largest, read.op)  # safetensors slices: this rank's rows only

        with pytest.raises(CheckpointError, match="model.embed_tokens.weight.*NaN"):
            materialize(sharded(), ("hf", bad_dir), 0, device, world)  # only the last rank reads the NaN
    finally:
        close_world(world)


@pytest.mark.parametrize(
    "world_size, sets",
    [(2, []), (4, ["parallel.ep=2"])],
    ids=["fsdp2", "ep2_of_4"],
)
def test_each_rank_materialises_only_its_shards_of_the_layout_free_values(tmp_path, world_size, sets):
    args = make_args()
    save_hf(make_model(args, seed=5), tmp_path / "hf")
    bad = tmp_path / "bad"
    save_hf(make_model(args, seed=5), bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.embed_tokens.weight"][-1, 0] = float("nan")  # the last row: the last rank's shard
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    mp.start_processes(
        _worker,
        args=(world_size, _free_port(), sets, str(tmp_path / "hf"), str(bad)),
        nprocs=world_size,
        start_method="spawn",
    )


def test_blocks_are_one_expert_of_a_stack_and_bounded_rows_of_a_matrix():
    assert block_rows(torch.Size([256, 4096, 7168])) == 1  # one expert of v3's gate_up stack
    assert block_rows(torch.Size([129280, 7168])) == init.BLOCK_ELEMENTS // 7168
    assert block_rows(torch.Size([7])) == init.BLOCK_ELEMENTS


def test_one_process_init_is_reproducible_and_seeded():
    a, b, c = (DeepSeekV3(make_args()) for _ in range(3))
    a.init_weights(seed=1)
    b.init_weights(seed=1)
    c.init_weights(seed=2)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if p.ndim >= 2:
            assert not torch.equal(p, r), name
            assert abs(p.std().item() - a.args.initializer_range) < 0.5 * a.args.initializer_range, name
