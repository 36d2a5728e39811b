"""The expert prune with NAEE in memory re-fits each layer as soon as NAEE has chosen its
experts (``prune.checkpoint._prune_and_repair_beside``): the same output, bit for bit, as the
selection followed by the re-fit (``REPAIR_BESIDE_SELECTION = False``)."""

from __future__ import annotations

import json

import pytest
import torch

from moecompress.prune import checkpoint as prune_ckpt
from moecompress.prune import prune_checkpoint
from moecompress.testing import SAMPLE_TEXT, TINY_CONFIGS, saved_tensors, tiny_checkpoint

FAMILIES = sorted(TINY_CONFIGS)


def _outputs(folder):
    record = json.loads((folder / "moecompress.json").read_text())
    info = record["info"]
    info.pop("repair_beside_selection", None)
    return saved_tensors(folder), json.loads((folder / "config.json").read_text()), record["kept_experts"], info


def _both_ways(src, calib, tmp_path, monkeypatch, **kw):
    out = {}
    for beside in (True, False):
        monkeypatch.setattr(prune_ckpt, "REPAIR_BESIDE_SELECTION", beside)
        folder = tmp_path / f"beside-{beside}"
        result = prune_checkpoint(src, folder, calib=str(calib), n=4, seq_len=32, progress=False, **kw)
        assert bool(result.info.get("repair_beside_selection")) == beside
        out[beside] = _outputs(folder)
    return out[True], out[False]


@pytest.mark.parametrize("family", FAMILIES)
def test_repair_beside_the_selection_writes_the_same_bytes(family, tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "src", family)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    # 4 of 8 keeps the routing groups of the grouped families (2 x 2), 5 does not
    for keep in (4, 5):
        beside, after = _both_ways(tmp_path / "src", tmp_path / "calib.txt", tmp_path / str(keep), monkeypatch,
                                   keep=keep, method="naee", repair="refit")
        (tb, cb, kb, ib), (ta, ca, ka, ia) = beside, after
        assert kb == ka and cb == ca and ib == ia, family
        assert tb.keys() == ta.keys()
        for k in tb:
            assert torch.equal(tb[k], ta[k]), (family, keep, k)


def test_router_refit_beside_the_selection_writes_the_same_bytes(tmp_path, monkeypatch):
    """The router rows are published too (refit+router), and the default method (auto: NAEE)."""
    tiny_checkpoint(tmp_path / "src", "qwen3_moe")
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    for kw in (dict(keep=5, repair="refit+router"), dict(keep=4)):
        beside, after = _both_ways(tmp_path / "src", tmp_path / "calib.txt", tmp_path / str(len(kw)), monkeypatch,
                                   **kw)
        assert beside[1:] == after[1:]
        assert all(torch.equal(beside[0][k], after[0][k]) for k in after[0])


def test_beside_the_selection_on_a_sharded_checkpoint(tmp_path, monkeypatch):
    """Shards that split a layer's experts: the surgery plans the output from the kept count
    before the experts are chosen (surgery.LateKept); the tensors are the same."""
    from moecompress.testing import char_tokenizer, tiny_model

    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "src", max_shard_size="30KB")
    char_tokenizer().save_pretrained(tmp_path / "src")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 3
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    beside, after = _both_ways(tmp_path / "src", tmp_path / "calib.txt", tmp_path, monkeypatch, keep=5,
                               method="naee", repair="refit")
    assert beside[1:] == after[1:]
    assert beside[0].keys() == after[0].keys()
    assert all(torch.equal(beside[0][k], after[0][k]) for k in after[0])
    index = json.loads((tmp_path / "beside-True" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(beside[0])
