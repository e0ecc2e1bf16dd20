"""A checkpoint from elsewhere is data, never code: DCP's pickled ``.metadata`` and its
pickled non-tensor values are read through allow-lists, even when the manifest was
recomputed to match; and a step set aside as corrupt twice does not stop a restart."""

import io
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from anychip.checkpoint import Checkpointer, committed, verify, write_manifest
from anychip.config import load_config
from anychip.dcp_reader import read_metadata, safe_load
from anychip.errors import CheckpointError
from anychip.train.loop import train

RUN = [
    "model.preset=debug",
    "train.steps=2",
    "train.global_batch=4",
    "train.seq_len=48",
    "train.warmup_steps=1",
    "train.mode=pretrain",
    "eval.n=0",
    "log.tensorboard=false",
    "device.type=cpu",
    "checkpoint.interval=2",
    "parallel.max_restarts=0",
]


class TouchOnUnpickle:
    """What an attacker ships: unpickling it creates ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("safety") / "run"
    train(load_config(None, RUN), run)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the trained run, to tamper with."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def newest(run: Path) -> Path:
    return committed(run / "checkpoints")[0]


def empty_state(directory: Path) -> dict:
    """Every entry of the checkpoint: tensors of the saved shape, values as None."""
    state = {}
    for key, md in dcp.FileSystemReader(directory).read_metadata().state_dict_metadata.items():
        state[key] = torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata) else None
    return state


def test_a_real_checkpoint_loads_through_the_safe_reader_identical_to_dcp(trained):
    directory = newest(trained)
    ours, theirs = empty_state(directory), empty_state(directory)
    assert any(k.startswith("model.") for k in ours) and any(k.startswith("optim.state.") for k in ours)
    safe_load(ours, directory, no_dist=True)
    dcp.load(theirs, checkpoint_id=str(directory), no_dist=True)
    for key in theirs:
        if isinstance(theirs[key], torch.Tensor):
            assert torch.equal(ours[key], theirs[key]), key
        else:
            assert ours[key] == theirs[key], key
    assert ours["optim.param_groups.0.betas"] == (0.9, 0.95)  # a non-tensor value, read through the check


def test_metadata_that_would_create_a_file_is_refused_before_it_runs(run, tmp_path):
    directory, marker = newest(run), tmp_path / "created_by_the_checkpoint"
    (directory / ".metadata").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    write_manifest(directory)
    assert verify(directory) is None  # the manifest cannot tell: whoever ships the run recomputes it
    expected = f"{directory / '.metadata'}: refers to pathlib.Path.touch, which a DCP checkpoint never holds"
    with pytest.raises(CheckpointError, match=expected):
        read_metadata(directory)
    with pytest.raises(CheckpointError, match=expected):
        safe_load({"model": {}}, directory, no_dist=True)  # what export and --init do
    assert not marker.exists()


def test_resuming_from_a_checkpoint_whose_metadata_would_create_a_file_stops_with_an_error(run, tmp_path):
    directory, marker = newest(run), tmp_path / "created_by_the_checkpoint"
    (directory / ".metadata").write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    write_manifest(directory)
    with pytest.raises(CheckpointError, match=r"\.metadata: refers to pathlib\.Path\.touch"):
        train(load_config(run / "config.toml", ["train.steps=4"]), run)  # Checkpointer.load_latest
    assert not marker.exists()


def test_a_non_tensor_value_that_would_create_a_file_is_refused_before_it_runs(run, tmp_path):
    # DCP itself loads non-tensor values with torch.load(weights_only=False)
    directory, marker = newest(run), tmp_path / "created_by_the_checkpoint"
    metadata = read_metadata(directory)
    index = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
    assert isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata)
    payload = io.BytesIO()
    torch.save(TouchOnUnpickle(marker), payload)
    (directory / "values.distcp").write_bytes(payload.getvalue())
    info = metadata.storage_data[index]
    info.relative_path, info.offset, info.length = "values.distcp", 0, len(payload.getvalue())
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))  # itself only allowed classes
    write_manifest(directory)
    # torch.save pickles Path.touch as getattr(Path, "touch"): torch lists every global outside its allow-list
    expected = r"values\.distcp: refers to .*pathlib\.Path\b.* \(in the value of optim\.param_groups\.0\.lr\)"
    with pytest.raises(CheckpointError, match=expected):
        safe_load(empty_state(directory), directory, no_dist=True)
    assert not marker.exists()


def test_metadata_naming_a_data_file_outside_the_checkpoint_is_refused(run):
    directory = newest(run)
    metadata = read_metadata(directory)
    next(iter(metadata.storage_data.values())).relative_path = "../../config.toml"
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"names the data file '\.\./\.\./config\.toml'"):
        read_metadata(directory)


def test_a_step_set_aside_as_corrupt_again_gets_a_numbered_name(tmp_path):
    events = []
    state = SimpleNamespace(
        world=SimpleNamespace(distributed=False, is_main=True, rank=0, world_size=1),
        log=SimpleNamespace(event=lambda name, **kw: events.append(name), print=lambda *a: None),
        device=SimpleNamespace(type="cpu"),
    )
    root = tmp_path / "checkpoints"
    checkpointer = Checkpointer(state, root)
    for _ in range(3):  # three restarts, each finding step 8 corrupt (no manifest) again
        (root / "step_00000008").mkdir(parents=True)
        assert checkpointer.load_latest() is None
    assert sorted(p.name for p in root.iterdir()) == [
        "corrupt_step_00000008",
        "corrupt_step_00000008_1",
        "corrupt_step_00000008_2",
    ]
    assert committed(root) == [] and events == ["checkpoint_corrupt"] * 3
