"""Merged blocks on disk: a re-fit's edit is written in place, the rest of the file is not."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from moecompress.arch import moe_view
from moecompress.merge.offload import offload_block, write_back
from moecompress.onload import onloaded
from moecompress.testing import tiny_model


def _offloaded_layer(path):
    """The first MoE layer of a tiny bf16 model, its block offloaded to ``path``."""
    layer = moe_view(tiny_model("qwen3_moe", dtype=torch.bfloat16)).layers[0]
    offload_block(layer.block, path, torch.device("cpu"))
    return layer, layer.block


@torch.no_grad()
def test_write_back_writes_only_the_edited_tensor_in_place(tmp_path):
    path = tmp_path / "merged.safetensors"
    layer, block = _offloaded_layer(path)
    inode = path.stat().st_ino
    with onloaded(block):
        assert write_back(block) == []  # nothing edited: nothing written
        layer.down_proj[1].add_(1.0)  # what the re-fit does to a down projection
        expected = {k: p.detach().clone() for k, p in block.named_parameters()}
        assert write_back(block) == ["experts.down_proj"]
    assert path.stat().st_ino == inode  # updated in place, not rewritten aside
    save_file({k: v.contiguous() for k, v in sorted(expected.items())}, tmp_path / "fresh.safetensors")
    assert path.read_bytes() == (tmp_path / "fresh.safetensors").read_bytes()  # = a full rewrite
    with onloaded(block):
        torch.testing.assert_close(layer.down_proj[1], expected["experts.down_proj"][1], rtol=0, atol=0)


@torch.no_grad()
def test_write_back_of_named_edits_writes_those_without_comparing(tmp_path):
    layer, block = _offloaded_layer(tmp_path / "merged.safetensors")
    with onloaded(block):
        layer.down_proj[0].mul_(2.0)
        layer.router_weight.add_(0.5)  # changed, but not named: stays as in the file
        expected = {k: p.detach().clone() for k, p in block.named_parameters()}
        assert write_back(block, [layer.down_proj]) == ["experts.down_proj"]  # a view names its parameter
        assert write_back(block, []) == []
    with onloaded(block):
        torch.testing.assert_close(layer.down_proj, expected["experts.down_proj"].transpose(1, 2)
                                   if layer.down_proj.shape != expected["experts.down_proj"].shape
                                   else expected["experts.down_proj"], rtol=0, atol=0)
        assert not torch.equal(layer.router_weight, expected[next(k for k in expected if k.endswith("gate.weight"))])


@torch.no_grad()
def test_resident_reads_an_offloaded_block_once_for_every_use_inside(tmp_path):
    """``onload.resident``: the block's weights come in once; nested onloaded() blocks and
    forwards inside use them (no more reads of the file); on leaving they go back to the meta
    device and the hooks are back, so the next forward onloads them again."""
    from moecompress.onload import resident

    path = tmp_path / "merged.safetensors"
    layer, block = _offloaded_layer(path)
    weights = block.__dict__["_moecompress_weights"]
    reads = []
    original_get = type(weights).__getitem__

    def counting(self, key):
        reads.append(key)
        return original_get(self, key)

    type(weights).__getitem__ = counting
    try:
        x = torch.randn(1, 5, layer.hidden_size, dtype=torch.bfloat16)
        want = block(x)
        per_onload = len(reads)
        assert per_onload == len(dict(block.named_parameters()))
        reads.clear()
        with resident(block):
            assert all(p.device.type == "cpu" for p in block.parameters())
            with onloaded(block):
                pass
            got = block(x)
            got_again = block(x)
        assert len(reads) == per_onload  # once, for everything inside
        assert all(p.device.type == "meta" for p in block.parameters())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(got_again, want, rtol=0, atol=0)
        reads.clear()
        torch.testing.assert_close(block(x), want, rtol=0, atol=0)
        assert len(reads) == per_onload  # hooks back: the next forward onloads again
    finally:
        type(weights).__getitem__ = original_get
