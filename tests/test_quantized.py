"""Published quantized formats as input: block-wise FP8 (DeepSeek-V3 style) and MXFP4 (GPT-OSS).

Checkpoints are written in the stored format exactly (``testing.quantized_checkpoint``);
transformers' own quantizers (FineGrainedFP8Config / Mxfp4Config, dequantizing on a CPU) load
them. Pruning keeps the stored format with the kept experts' bytes unchanged; merging writes bf16.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moecompress import formats
from moecompress.checkpoint import load_model
from moecompress.prune import prune_checkpoint, prune_experts
from moecompress.testing import SAMPLE_TEXT, quantized_checkpoint, tokens

# FP8 for every family transformers' FP8 loader reads (PhiMoE's router and GraniteMoE's fused
# experts are not found by it); MXFP4 is GPT-OSS's format.
FORMATS = [(f, "fp8", {}) for f in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
                                    "glm4_moe", "llama4_text", "ernie4_5_moe")] + \
          [("gpt_oss", "mxfp4", {"intermediate_size": 32})]


def _expert_of(key):
    m = re.search(r"\.experts\.(\d+)\.", key)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("family, fmt, overrides", FORMATS, ids=[f"{f}-{q}" for f, q, _ in FORMATS])
def test_pruning_keeps_the_stored_format_bit_identical(family, fmt, overrides, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    quantized_checkpoint(src, family, fmt, **overrides)
    result = prune_checkpoint(src, out, keep=4, method="random", seed=3)  # the output passes `check` (automatic)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == fmt
    stored = [k for k in after if k.endswith(("weight_scale_inv", "_blocks", "_scales"))]
    assert stored and any(after[k].dtype in (torch.float8_e4m3fn, torch.uint8) for k in after)
    for key, t in after.items():
        li = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        kept = result.kept.get(li)
        j = _expert_of(key)
        if kept is not None and j is not None:  # per-expert key: position j holds input expert kept[j]
            src_key = key.replace(f".experts.{j}.", f".experts.{kept[j]}.")
            assert t.dtype == before[src_key].dtype and torch.equal(t.view(torch.uint8), before[src_key].view(torch.uint8)), key
        elif t.shape != before[key].shape:  # fused experts, router rows / biases: sliced along the expert dim
            d = next(d for d in range(t.dim()) if t.shape[d] != before[key].shape[d])
            assert torch.equal(t.view(torch.uint8), before[key].index_select(d, torch.tensor(kept)).view(torch.uint8)), key
        else:
            assert torch.equal(t.view(torch.uint8), before[key].view(torch.uint8)), key
    # The reloaded output computes what the dequantized input pruned in memory computes. The
    # tiny experts (24 wide, blocks of 16) have partial edge blocks, which stock transformers
    # dequantizes with a block it infers from the grid (12): compare through load_model, which
    # reads them as published (formats.partial_fp8_blocks); stock transformers must still load it.
    model = load_model(src)
    prune_experts(model, keep=4, method="random", seed=3)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, load_model(out).eval()(x).logits)
        assert torch.isfinite(AutoModelForCausalLM.from_pretrained(out).eval()(x).logits).all()


def test_statistics_and_naee_run_on_dequantized_weights(tmp_path):
    """The default method on an FP8 DeepSeek-V3 (grouped routing, kept per group) equals it on
    the same weights stored in bf16."""
    src, plain = tmp_path / "fp8", tmp_path / "bf16"
    quantized_checkpoint(src, "deepseek_v3", "fp8", n_routed_experts=8)
    load_model(src, dtype="float32").save_pretrained(plain)  # the exact dequantized weights, stored plainly
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    from moecompress.testing import char_tokenizer

    char_tokenizer().save_pretrained(plain)
    a = prune_checkpoint(src, tmp_path / "a", keep=4, calib=tmp_path / "calib.txt", n=4, seq_len=16)
    b = prune_checkpoint(plain, tmp_path / "b", keep=4, calib=tmp_path / "calib.txt", n=4, seq_len=16)
    assert a.method == "auto" and a.info["auto"]["method"] == "naee" and a.kept == b.kept
    assert json.loads((tmp_path / "a" / "config.json").read_text())["n_group"] == 2


def test_merge_of_a_quantized_checkpoint_writes_bf16(tmp_path):
    from moecompress.merge import merge_checkpoint

    src = tmp_path / "src"
    quantized_checkpoint(src, "qwen3_moe", "fp8")
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    merge_checkpoint(src, tmp_path / "out", keep=4, calib=tmp_path / "calib.txt", n=4, seq_len=16)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert "quantization_config" not in cfg and cfg["num_local_experts"] == 4
    assert {t.dtype for t in after.values()} <= {torch.bfloat16, torch.float32}


def test_fp8_and_mxfp4_helpers_match_transformers():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 64, 48)
    blocks, scales = formats.quantize_mxfp4(w)
    assert torch.equal(formats.dequantize_mxfp4(blocks, scales, torch.float32),
                       convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    q, s = formats.quantize_fp8(w[0, :32], (16, 8))
    assert torch.equal(formats.dequantize_fp8(q, s, (16, 8), torch.float32),
                       Fp8Dequantize(None)._dequantize_one(q, s, torch.float32))
    assert (formats.dequantize_fp8(q, s, (16, 8), torch.float32) - w[0, :32]).abs().max() <= s.max() * 32


@pytest.mark.parametrize("family, fmt, overrides", [("deepseek_v3", "fp8", {}), ("gpt_oss", "mxfp4", {"intermediate_size": 32})])
def test_stats_of_a_quantized_checkpoint_are_those_of_its_dequantized_weights(family, fmt, overrides, tmp_path):
    from moecompress.stats.api import stats_for_checkpoint
    from moecompress.testing import char_tokenizer

    src, plain = tmp_path / "q", tmp_path / "bf16"
    quantized_checkpoint(src, family, fmt, **overrides)
    load_model(src, dtype="float32").save_pretrained(plain)  # the exact dequantized values
    char_tokenizer().save_pretrained(plain)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    a = stats_for_checkpoint(src, calib=str(tmp_path / "calib.txt"), n=4, seq_len=16)
    b = stats_for_checkpoint(plain, calib=str(tmp_path / "calib.txt"), n=4, seq_len=16)
    for li in (1, 2):
        for name in ("count", "reap", "ean"):
            assert torch.equal(a.get(li, name), b.get(li, name)), (li, name)


def test_finegrained_pruning_of_a_quantized_checkpoint_writes_bf16(tmp_path):
    src = tmp_path / "src"
    quantized_checkpoint(src, "qwen3_moe", "fp8")
    prune_checkpoint(src, tmp_path / "out", method="magnitude", sparsity=0.5)  # passes `check` (automatic)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert "quantization_config" not in cfg
    assert {t.dtype for t in after.values()} <= {torch.bfloat16, torch.float32}
    w = after["model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert (w == 0).float().mean() == 0.5


def test_fp8_weights_with_partial_edge_blocks_load_and_prune(tmp_path):
    """DeepSeek-V3 stores kv_a_proj_with_mqa as [576, 7168] with 128-blocks (the last row block
    partial, scale grid [5, 56]); transformers' dequantizer alone refuses that shape. Blocks of 24
    make the same situation on a tiny model: every weight loads as our edge-aware dequantizer
    computes it, and pruning keeps the stored bytes."""
    from safetensors import safe_open

    src = tmp_path / "src"
    quantized_checkpoint(src, "deepseek_v3", "fp8", block=(24, 24), n_routed_experts=8)
    stored = load_file(src / "model.safetensors")
    partial = [k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn and (t.shape[-2] % 24 or t.shape[-1] % 24)]
    assert partial, "the test needs weights whose shape is not a multiple of the block"
    weights = load_model(src, dtype="float32").state_dict()
    for key, t in stored.items():  # non-expert weights keep their checkpoint names; experts are fused
        if t.dtype == torch.float8_e4m3fn and key in weights:
            want = formats.dequantize_fp8(t, stored[formats.stored_key(key, "scale")], (24, 24), torch.float32)
            assert torch.equal(weights[key], want), key
    key = next(k for k in partial if ".self_attn." in k)
    out = tmp_path / "out"
    prune_checkpoint(src, out, keep=4, method="random", seed=0)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(key).view(torch.uint8), stored[key].view(torch.uint8))


@pytest.mark.parametrize("family, fmt, overrides", [("deepseek_v3", "fp8", {}), ("gpt_oss", "mxfp4", {"intermediate_size": 32})])
def test_a_dequantized_model_saves_as_its_plain_family(family, fmt, overrides, tmp_path):
    """``load_model`` forgets the dequantizing conversions it loaded with, so ``save_pretrained``
    writes the plain family's layout and the dequantized values. transformers 5.17 could not
    reverse those conversions for FP8 (an error after a whole merge) and wrote MXFP4's wrongly."""
    src, plain = tmp_path / "q", tmp_path / "plain"
    quantized_checkpoint(src, family, fmt, **overrides)
    model = load_model(src, dtype="float32")
    assert getattr(model, "_weight_conversions", None) is None
    model.save_pretrained(plain)
    again = load_model(plain, dtype="float32")
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
