"""A .safetensors file written one tensor at a time, byte for byte what
``safetensors.torch.save_file`` writes for the same tensors.

The format: 8 bytes (little-endian u64) giving the header's length, the header (compact
JSON: ``"__metadata__"`` first, then each tensor's dtype, shape and data offsets, in data
order), padded with spaces to a multiple of 8 bytes, then the tensors' bytes back to back.
safetensors lays the tensors out by dtype (widest first, in its own order, ``DTYPES``),
then by name. Every offset follows from the names, dtypes and shapes alone, so the header
is written first and each tensor goes to its place as it is produced, in any order: the
memory held is the tensor being written, never the file.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence

import torch

# safetensors' names of the torch dtypes it stores, in the order its writer lays them out
# (safetensors 0.8's Dtype enum, descending; the header test compares with save_file)
DTYPES = {
    torch.uint64: "U64",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float32: "F32",
    torch.uint32: "U32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.uint16: "U16",
    torch.int16: "I16",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_RANK = {dtype: i for i, dtype in enumerate(DTYPES)}

TensorSpec = tuple[str, Sequence[int], torch.dtype]  # (name, shape, dtype)


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype``."""
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def layout(tensors: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The first bytes of the file of ``tensors`` (length, header, padding) and the file
    offset of each tensor's data, as ``save_file(..., metadata=metadata)`` writes them.

    With more than one metadata entry the header's bytes may differ from safetensors'
    (which writes them in hash order); the file reads the same. Raises ValueError naming
    the tensor for a dtype safetensors cannot store or a name given twice."""
    specs = list(tensors)
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"tensor names given more than once: {twice}")
    for name, _, dtype in specs:
        if dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
    specs.sort(key=lambda s: (_RANK[s[2]], s[0]))  # code-point order of str is Rust's byte order of UTF-8
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    starts, offset = {}, 0
    for name, shape, dtype in specs:
        size = nbytes(shape, dtype)
        header[name] = {
            "dtype": DTYPES[dtype],
            "shape": [int(d) for d in shape],
            "data_offsets": [offset, offset + size],
        }
        starts[name] = offset
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # serde_json's form
    text += b" " * (-len(text) % 8)
    first = struct.pack("<Q", len(text)) + text
    return first, {name: len(first) + start for name, start in starts.items()}


class SafetensorsWriter:
    """A .safetensors file at ``path`` holding ``tensors`` (name, shape, dtype), filled by
    ``write`` in any order; ``close`` checks that each was written once.

    The bytes equal ``safetensors.torch.save_file`` of the same tensors with ``metadata``.
    ``write`` raises ValueError naming the tensor for an unknown name, a second write, or a
    dtype or shape other than declared; ``close`` raises ValueError naming the tensors not
    written (the file is then incomplete). Used as a context manager, the file is closed
    unchecked when the block raises."""

    def __init__(self, path: str | os.PathLike, tensors: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        specs = list(tensors)
        first, self.offsets = layout(specs, metadata)
        self.declared = {name: (tuple(int(d) for d in shape), dtype) for name, shape, dtype in specs}
        self.path = path
        self.written: set[str] = set()
        self.file = open(path, "wb")
        self.file.write(first)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put ``tensor`` (any device, any strides) at its place in the file."""
        if name not in self.declared:
            raise ValueError(f"{self.path}: tensor {name!r} is not one of the file's")
        if name in self.written:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        shape, dtype = self.declared[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; declared {dtype} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.seek(self.offsets[name])
        self.file.write(memoryview(data))  # the tensor's own bytes, no copy (little-endian, as safetensors)
        self.written.add(name)

    def close(self) -> None:
        """Flush and close the file; raises ValueError when a declared tensor was not written."""
        self.file.close()
        missing = [n for n in self.declared if n not in self.written]
        if missing:
            raise ValueError(f"{self.path}: incomplete, {len(missing)} tensor(s) never written: {missing[:5]}")

    def abandon(self) -> None:
        """Close the file unchecked, for a caller that gives it up (and deletes it)."""
        self.file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()
