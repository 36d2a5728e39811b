"""The tensor-by-tensor safetensors writer: files the safetensors library reads back exactly."""

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moecompress.shardwriter import DTYPE_NAMES, Entry, SafetensorsWriter, aligned_order


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
            "a.f32": torch.randn(4, generator=g),
            "c.i64": torch.arange(6).reshape(2, 3),
            "d.u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
            "e.bool": torch.tensor([True, False, True]),
            "f.f8": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
            "g.scalar": torch.tensor(2.5, dtype=torch.float16),
            "h.empty": torch.zeros(0, 7)}


def _entries(tensors):
    return [Entry(k, DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in tensors.items()]


def test_written_file_reads_back_exactly(tmp_path):
    tensors = _tensors()
    entries = aligned_order(_entries(tensors))
    with SafetensorsWriter(tmp_path / "x.safetensors", entries, {"format": "pt"}) as w:
        for e in entries:
            w.write(e.name, tensors[e.name])
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k  # bits
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0 and raw[8:9] == b"{"  # the library's padding
    assert len(raw) == 8 + n + sum(e.nbytes for e in entries)  # no holes


def test_aligned_order_keeps_an_aligned_order_and_fixes_a_misaligned_one():
    ok = [Entry("z", "F32", (2,)), Entry("a", "BF16", (3,)), Entry("b", "U8", (1,))]
    assert aligned_order(ok) == ok  # offsets 0, 8, 14: each a multiple of its element size
    bad = [Entry("a", "U8", (3,)), Entry("b", "F32", (2,)), Entry("c", "BF16", (1,))]
    assert [e.name for e in aligned_order(bad)] == ["b", "c", "a"]  # the library's rule: larger elements first
    offset = 0
    for e in aligned_order(bad):
        assert offset % {"F32": 4, "BF16": 2, "U8": 1}[e.dtype] == 0
        offset += e.nbytes


def test_writer_refuses_a_tensor_out_of_order_or_of_the_wrong_kind_and_a_short_file(tmp_path):
    entries = [Entry("a", "F32", (2,)), Entry("b", "F32", (2,))]
    for name, t, msg in (("b", torch.zeros(2), "expected"), ("a", torch.zeros(3), "expected"),
                         ("a", torch.zeros(2, dtype=torch.float64), "expected")):
        with pytest.raises(ValueError, match=msg), SafetensorsWriter(tmp_path / "y.safetensors", entries) as w:
            w.write(name, t)
    with pytest.raises(ValueError, match="1 of 2 tensors were not written"):
        with SafetensorsWriter(tmp_path / "z.safetensors", entries) as w:
            w.write("a", torch.zeros(2))
