"""Multi-token-prediction layers stored in a checkpoint (DeepSeek-V3 / GLM-4.5 style)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.check import check_checkpoint
from moecompress.errors import MoECompressError
from moecompress.prune import prune_checkpoint
from moecompress.testing import SAMPLE_TEXT, invoke_cli, tiny_checkpoint, with_mtp_layer

MTP = "model.layers.3."  # tiny models have 3 decoder layers


@pytest.fixture(params=["deepseek_v3", "glm4_moe"])
def mtp_ckpt(request, tmp_path):
    src = tmp_path / "src"
    tiny_checkpoint(src, request.param)
    with_mtp_layer(src)
    # The MTP router never picks experts 0, 1, 4, 5: their correction bias is far below the rest.
    t = load_file(src / "model.safetensors")
    t[MTP + "mlp.gate.e_score_correction_bias"][[0, 1, 4, 5]] = -100.0
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    return src, tmp_path / "calib.txt"


def test_mtp_layer_is_pruned_by_its_own_router(mtp_ckpt, tmp_path):
    src, calib = mtp_ckpt
    assert check_checkpoint(src).ok
    res = prune_checkpoint(src, tmp_path / "out", keep=4, method="frequency", calib=calib, n=8, seq_len=32)
    out = tmp_path / "out"
    record = json.loads((out / "moecompress.json").read_text())
    assert record["mtp"]["kept_experts"] == {"3": [2, 3, 6, 7]}  # two of each routing group, never-picked ones gone
    assert [record["mtp"]["counts"]["3"][e] for e in (0, 1, 4, 5)] == [0, 0, 0, 0]
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for j, e in enumerate([2, 3, 6, 7]):  # per-expert MTP keys: renamed, bytes unchanged
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(after[f"{MTP}mlp.experts.{j}.{part}.weight"], before[f"{MTP}mlp.experts.{e}.{part}.weight"])
    assert torch.equal(after[MTP + "mlp.gate.weight"], before[MTP + "mlp.gate.weight"][[2, 3, 6, 7]])
    assert not any(k.startswith(MTP + "mlp.experts.4.") for k in after)
    assert torch.equal(after[MTP + "eh_proj.weight"], before[MTP + "eh_proj.weight"])
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    report = check_checkpoint(out)
    assert report.ok and not report.notes, (report.problems, report.notes)
    assert res.kept.keys() == {1, 2}


def test_mtp_layer_dropped_on_request(mtp_ckpt, tmp_path):
    src, calib = mtp_ckpt
    r = invoke_cli("prune", src, "-o", tmp_path / "out", "--keep", 4, "--method", "random", "--mtp", "drop")
    assert r.exit_code == 0, r.output
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert not any(k.startswith(MTP) for k in after)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert check_checkpoint(tmp_path / "out").ok


def test_mtp_layer_uses_the_default_calibration_when_the_method_needs_none(mtp_ckpt, tmp_path):
    """`random` needs no text, but the MTP router does: the default calibration set feeds it."""
    src, _ = mtp_ckpt
    prune_checkpoint(src, tmp_path / "out", keep=4, method="random", n=4, seq_len=32)
    record = json.loads((tmp_path / "out" / "moecompress.json").read_text())
    assert record["mtp"]["mode"] == "prune" and record["parameters"]["calib"] == "python_docs"
    assert len(record["mtp"]["kept_experts"]["3"]) == 4


def test_an_mtp_layer_left_with_every_expert_fails_the_check(mtp_ckpt, tmp_path):
    """What surgery did before: the MTP MoE copied unchanged while the config says 4 experts."""
    src, _ = mtp_ckpt
    prune_checkpoint(src, tmp_path / "out", keep=4, method="random", mtp="drop")
    out = tmp_path / "out"
    t = load_file(out / "model.safetensors")
    t.update({k: v for k, v in load_file(src / "model.safetensors").items() if k.startswith(MTP)})
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    assert check_checkpoint(out).problems[0].startswith(f"{MTP}mlp.experts.4.down_proj.weight: not implied by the config")


def test_merge_prunes_the_mtp_layer_by_its_own_router(mtp_ckpt, tmp_path):
    from moecompress.merge import merge_checkpoint

    src, calib = mtp_ckpt
    merge_checkpoint(src, tmp_path / "out", keep=4, calib=calib, n=8, seq_len=32)  # passes `check` (automatic)
    record = json.loads((tmp_path / "out" / "moecompress.json").read_text())
    assert record["mtp"]["kept_experts"] == {"3": [2, 3, 6, 7]}
    assert sum(k.startswith(MTP + "mlp.experts.") for k in load_file(tmp_path / "out" / "model.safetensors")) == 12


def test_fp8_checkpoint_with_an_mtp_layer(tmp_path):
    """DeepSeek-V3 as published: FP8 blocks and an MTP layer; kept MTP experts and their block
    scales are copied byte for byte."""
    from moecompress.testing import quantized_checkpoint

    src = tmp_path / "src"
    quantized_checkpoint(src, "deepseek_v3", "fp8")
    with_mtp_layer(src)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    prune_checkpoint(src, tmp_path / "out", keep=4, method="frequency", calib=str(tmp_path / "calib.txt"), n=8,
                     seq_len=32)
    kept = json.loads((tmp_path / "out" / "moecompress.json").read_text())["mtp"]["kept_experts"]["3"]
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for j, e in enumerate(kept):
        for part in ("gate_proj.weight", "gate_proj.weight_scale_inv", "down_proj.weight", "down_proj.weight_scale_inv"):
            a, b = after[f"{MTP}mlp.experts.{j}.{part}"], before[f"{MTP}mlp.experts.{e}.{part}"]
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert after[MTP + "mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
