"""A safetensors file written one tensor at a time, in an order fixed before the first byte.

Why not the ``safetensors`` library's writer: ``save_file`` takes every tensor of a file at once,
so a shard can start to be written only when all of its tensors exist. The pruning surgery that
runs beside the re-fit (``surgery.prune_checkpoint_files`` with :class:`surgery.PublishedReplacements`)
has most of a shard long before the last re-fitted layer; written tensor by tensor, the disk works
while the GPU does, and only one tensor is held in memory at a time. The format is the published
one (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header
length, a JSON header (``__metadata__`` and, per tensor, ``dtype``, ``shape`` and
``data_offsets`` into the data that follows, which has no holes), padded with spaces to a
multiple of 8 bytes as the library pads it; the files are read back with the library itself
(``tests/test_shardwriter.py``).

Each tensor must start at a multiple of its element size (readers view the mapped bytes as the
dtype): :func:`aligned_order` keeps the caller's order where it is aligned, else falls back to
the library's own rule (larger elements first).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names (the header's), for torch's dtypes and back, and their element sizes;
# the one table for every module that reads or writes safetensors headers
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
DTYPE_NAMES.update({getattr(torch, t): n for t, n in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                                                     ("float8_e8m0fnu", "F8_E8M0")) if hasattr(torch, t)})
TORCH_DTYPES = {n: t for t, n in DTYPE_NAMES.items()}
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
            "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` as a safetensors file stores them (contiguous, row-major), on the CPU."""
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy())


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its name, safetensors dtype name and shape."""
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


def aligned_order(entries: list[Entry]) -> list[Entry]:
    """``entries`` in their order if every tensor then starts at a multiple of its element
    size, else sorted as the safetensors library writes them (element size descending, then name)."""
    offset = 0
    for e in entries:
        if offset % ITEMSIZE[e.dtype]:
            return sorted(entries, key=lambda e: (-ITEMSIZE[e.dtype], e.name))
        offset += e.nbytes
    return list(entries)


class SafetensorsWriter:
    """``with SafetensorsWriter(path, entries, metadata) as w: w.write(name, tensor)`` for every
    entry, in the order of ``entries``. The header is written first; a tensor that does not match
    its entry (name, dtype, shape) is refused. Closing before every entry was written raises (the
    file would be truncated)."""

    def __init__(self, path: str | os.PathLike, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path, self.entries = Path(path), list(entries)
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for e in self.entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(text)) + text)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        e = self.entries[self._next] if self._next < len(self.entries) else None
        got = Entry(name, DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape))
        if got != e:
            raise ValueError(f"{self.path.name}: expected {e}, got {got}")
        if e.nbytes:
            self._fh.write(tensor_bytes(tensor))
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self.entries):
            raise ValueError(f"{self.path.name}: {len(self.entries) - self._next} of {len(self.entries)} tensors "
                             "were not written")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._fh.close()
