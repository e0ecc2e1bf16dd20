"""Reading DCP checkpoints without running code they hold.

DCP's own FileSystemReader unpickles ``.metadata`` with ``pickle.load`` and each
non-tensor value (the optimizer's hyper-parameters) with ``torch.load(weights_only=False)``:
a checkpoint made elsewhere could run any code when it is loaded, and its manifest cannot
tell, since whoever ships the checkpoint recomputes it. The reader here reads the same
files, but ``.metadata`` only through an allow-list of the classes DCP writes, each
non-tensor value first through torch's weights-only unpickler, and data files only from
the checkpoint's own directory. Tensors DCP already reads with ``weights_only=True``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from .errors import CheckpointError

_DCP = "torch.distributed.checkpoint"
# every global in the .metadata of real anychip checkpoints (one process, DDP and FSDP on two,
# fp32 and bf16, model and optimizer), listed by an Unpickler that recorded find_class; plus
# every dtype, since a run may store any. Nothing here runs code or touches files when called.
_METADATA_NAMES = (
    "Metadata",
    "StorageMeta",
    "MetadataIndex",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "_MEM_FORMAT_ENCODING",
)
ALLOWED = {
    *((f"{_DCP}.metadata", name) for name in _METADATA_NAMES),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how torch pickles a layout (torch.strided)
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib._local", "PosixPath"),  # ... as Python 3.13 pickles it
    *(("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals in ALLOWED: anything else is refused before it is called."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise CheckpointError(_refusal(self.path, f"{module}.{name}"))
        return super().find_class(module, name)


def _refusal(path: Path, name: str) -> str:
    return f"{path}: refers to {name}, which a DCP checkpoint never holds; refusing to load it"


def _unpickle_metadata(path: Path) -> Metadata:
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable as DCP metadata ({e!r})") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, DCP metadata is a Metadata")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise CheckpointError(f"{path}: names the data file {name!r}; DCP data files lie in its directory")
    return metadata


def read_metadata(directory: str | Path) -> Metadata:
    """The DCP metadata of checkpoint ``directory`` (its ``.metadata``), unpickled without
    running any code it holds. Raises CheckpointError naming the file when it is missing or
    unreadable, refers to any global outside ALLOWED (naming that global; it is never
    called), or names a data file outside ``directory``."""
    return _unpickle_metadata(Path(directory) / ".metadata")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = _unpickle_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if metadata.storage_meta is None:  # as FileSystemReader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _PlainValues(planner, self))


class _PlainValues:
    """DCP's load planner, except that each non-tensor value must load with torch's
    weights-only unpickler before the planner's own ``torch.load(weights_only=False)``."""

    def __init__(self, planner, reader: _SafeReader):
        self.planner, self.reader = planner, reader

    def __getattr__(self, name):
        return getattr(self.planner, name)

    def load_bytes(self, read_item, value) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:
            value.seek(0)
            path = Path(self.reader.path) / self.reader.storage_data[read_item.storage_index].relative_path
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(value))
            if unsafe:
                raise CheckpointError(
                    _refusal(path, f"{unsafe} (in the value of {read_item.dest_index.fqn})")
                ) from None
            raise CheckpointError(f"{path}: the value of {read_item.dest_index.fqn} is unreadable ({e!r})") from e
        value.seek(0)
        self.planner.load_bytes(read_item, value)


def safe_reader(directory: str | Path) -> dcp.FileSystemReader:
    """A DCP storage reader of checkpoint ``directory`` that runs no code the checkpoint
    holds (see read_metadata; non-tensor values must be plain data). What it refuses raises
    CheckpointError inside DCP, which reports it wrapped in its CheckpointException (and
    first tries ``__0.metadata`` when ``.metadata`` is refused): safe_load unwraps it."""
    return _SafeReader(directory)


def safe_load(state_dict: dict, directory: str | Path, no_dist: bool = False) -> None:
    """``dcp.load(state_dict, ...)`` from checkpoint ``directory`` through safe_reader: fills
    ``state_dict`` in place. Raises CheckpointError naming the file (and the global) when the
    checkpoint holds anything but data; DCP's own errors (a missing key, a shape) unchanged."""
    read_metadata(directory)  # refused here, before DCP, which would log it and try __0.metadata
    try:
        dcp.load(state_dict, storage_reader=safe_reader(directory), no_dist=no_dist)
    except CheckpointException as e:
        refused = [error for error, _ in e.failures.values() if isinstance(error, CheckpointError)]
        if refused:
            raise refused[0] from e
        raise
