"""Quantization: grids and GPTQ against references, the integer program against brute force,
honest bit accounting against the bytes written, compressed-tensors reload against fake."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.errors import MoECompressError
from moecompress.quantize import allocate, quantize_checkpoint, quantize_model
from moecompress.quantize.gptq import gptq
from moecompress.quantize.grid import FP8, dequantized, matrix_bits, rtn, weight_args
from moecompress.testing import invoke_cli, tiny_checkpoint, tiny_model, tokens

FUSED = {"gpt_oss", "llama4_text", "granitemoe"}  # checkpoints store fused 3-D experts


@pytest.mark.parametrize("bits,group,sym", [(4, 8, True), (3, 16, False), (2, 0, True), (8, 8, False)])
def test_rtn_error_within_half_a_step(bits, group, sym):
    w = torch.randn(24, 32, generator=torch.Generator().manual_seed(bits))
    args = weight_args(bits, group, sym)
    deq, q = rtn(w, args, torch.float32)
    step = q.scale.repeat_interleave(group or 32, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(dequantized(deq, q, args), deq)  # on the grid: quantize -> dequantize is the identity
    ints = torch.round(deq.reshape(24, -1, group or 32) / q.scale[..., None] + q.zero_point[..., None].float())
    assert ints.min() >= -(2 ** (bits - 1)) and ints.max() <= 2 ** (bits - 1) - 1


def test_fp8_relative_error():
    w = torch.randn(16, 32)
    deq, _ = rtn(w, weight_args(FP8, 0, True), torch.float32)
    assert ((deq - w).abs() <= w.abs().amax(1, keepdim=True) * 2 ** -3).all()  # e4m3: 3 mantissa bits


def test_gptq_is_rtn_for_uncorrelated_inputs_and_beats_it_otherwise():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    args = weight_args(3, 16, True)
    same, _ = gptq(w, torch.eye(64) * 5.0, args, torch.float32)
    assert torch.equal(same, rtn(w, args, torch.float32)[0])  # H diagonal: no error to spread
    x = torch.randn(400, 64, generator=g) @ torch.randn(64, 64, generator=g)
    q, qp = gptq(w, x.T @ x, args, torch.float32)
    err = lambda v: float(((x @ (v - w).T) ** 2).sum())  # noqa: E731
    assert err(q) < 0.7 * err(rtn(w, args, torch.float32)[0])
    assert torch.equal(dequantized(q, qp, args), q)


def test_integer_program_equals_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(25):
        cost = rng.random((5, 3)) * rng.choice([1e-6, 1.0, 1e3])
        size = np.tile([2.0, 3.0, 4.0], (5, 1)) * rng.integers(1, 4, (5, 1))
        budget = float(size[:, 1].sum() * rng.uniform(0.75, 1.2))
        a, b = allocate.solve(cost, size, budget), allocate.brute_force(cost, size, budget)
        total = lambda ch: sum(cost[i, j] for i, j in enumerate(ch))  # noqa: E731
        assert total(a) == pytest.approx(total(b), rel=1e-9)
        assert sum(size[i, j] for i, j in enumerate(a)) <= budget + 1e-9
    with pytest.raises(MoECompressError):
        allocate.solve(np.ones((2, 2)), np.array([[2.0, 4.0], [2.0, 4.0]]), 3.0)


@pytest.mark.parametrize("granularity", ["expert", "layer"])
def test_budget_met_as_counted(granularity):
    model = tiny_model("qwen3_moe")
    res = quantize_model(model, tokens(4, 24), granularity=granularity, bits=3, candidates=[2, 3, 4], quantizer="rtn",
                         group_size=8, format="fake", progress=False)
    uniform = sum(matrix_bits(s, 3, 8, True, 32) for s in res.expert_shapes.values()) * 8 * 2  # 8 experts, 2 layers
    assert res.budget_bits == pytest.approx(uniform)
    assert res.total_bits <= res.budget_bits + 1e-6
    assert res.average_bits == pytest.approx(res.total_bits / res.expert_weights)
    assert res.average_bits > 3  # scales count: 3 bits + 32/8 per weight at most
    ws = {w for v in res.widths.values() for w in v}
    assert ws <= {2, 3, 4}
    if granularity == "layer":
        assert all(len(set(v)) == 1 for v in res.widths.values())


def test_mc_moe_cost_orders_experts_by_importance():
    eps = np.array([[4.0, 2.0, 1.0]] * 3)
    freq, weight = np.array([1.0, 2.0, 7.0]), np.array([1.0, 2.0, 7.0])
    cost = allocate.allocation_cost("mc-moe-paper", eps, freq, weight, 1.0, 1.5)
    imp = (freq / 10) * (weight / 10) ** 1.5  # MC-MoE Eq. 5: both normalised within the layer
    np.testing.assert_allclose(cost, imp[:, None] * eps)
    size = np.tile([2.0, 3.0, 4.0], (3, 1))
    assert allocate.solve(cost, size, 9.0) == [0, 1, 2]  # the most used expert gets the widest
    # the default: the squared routed output error, no importance factor on top (it is in eps)
    np.testing.assert_allclose(allocate.allocation_cost("mc-moe", eps, freq, weight, 1.0, 1.5), eps ** 2)
    assert allocate.solve(allocate.allocation_cost("mc-moe", eps, freq, weight, 1.0, 1.5), size, 9.0) == [1, 1, 1]


def test_output_loss_is_the_layer_output_error_of_one_quantized_expert():
    """eps_{i,b} = ||Z - Z^||_F of the MoE block's routed output on the sampled tokens when only
    expert i is quantized, routing weights included (MC-MoE's loss term)."""
    from types import SimpleNamespace

    from moecompress.arch import moe_view
    from moecompress.quantize.experts import PARTS, output_loss

    torch.manual_seed(0)
    layer = moe_view(tiny_model("mixtral")).layers[0]
    x = torch.randn(64, layer.hidden_size)
    r = layer.route(x)
    traffic = SimpleNamespace(sample=[(x[:40], r.topk_idx[:40], r.topk_weight[:40]),
                                      (x[40:], r.topk_idx[40:], r.topk_weight[40:])])
    e = int(r.topk_idx[0, 0])
    mats = dict(zip(PARTS, (layer.gate_proj[e], layer.up_proj[e], layer.down_proj[e])))
    q = {p: rtn(w, weight_args(2, 8, True), torch.float32)[0] for p, w in mats.items()}
    with torch.no_grad():
        ref = layer.routed_forward(x, r)
        eps = output_loss(layer, e, traffic, q)
        old = [m.clone() for m in mats.values()]
        layer.set_expert(e, *(q[p] for p in PARTS))
        new = layer.routed_forward(x, r)
        layer.set_expert(e, *old)
    assert eps > 0
    assert eps == pytest.approx(float((ref - new).double().norm()), rel=1e-4)


def test_narrow_experts_take_the_largest_group_that_divides_them():
    from moecompress.quantize.api import resolve_group_size

    qwen = {"gate": (64, 256), "up": (64, 256), "down": (256, 64)}  # the testbed's 32 x 64 experts
    assert resolve_group_size(qwen, 128) == (64, "--group-size 128 does not divide the experts' input size 64; using 64")
    assert resolve_group_size(qwen, 64) == (64, None) and resolve_group_size(qwen, 0) == (0, None)
    assert resolve_group_size({"down": (256, 96)}, 128)[0] == 32
    assert resolve_group_size({"down": (256, 48)}, 128)[0] == 0  # no group >= 32 divides 48: per channel
    model = tiny_model("qwen3_moe")  # hidden 32, expert intermediate 16
    res = quantize_model(model, None, scheme="w4a16", quantizer="rtn", group_size=32, progress=False)
    assert res.options["group_size"] == 0 and res.notes == [
        "--group-size 32 does not divide the experts' input size 16; using one scale per output channel (0)"]
    assert res.total_bits == sum(matrix_bits(s, 4, 0, True, 32) for s in res.expert_shapes.values()) * 8 * 2


def _logits(folder, t):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(t).logits


CALIB = dict(n=4, seq_len=48, group_size=8, progress=False, min_tokens=1)


@pytest.mark.parametrize("extra", [dict(quantizer="gptq", scheme="w4a16"),
                                   dict(quantizer="gptq", bits=3, non_expert_bits=8),
                                   dict(scheme="fp8")])
def test_compressed_tensors_reloads_equal_to_fake(calib_ckpt, extra):
    from compressed_tensors.quantization import QuantizationConfig

    src, calib = calib_ckpt / "tiny", str(calib_ckpt / "calib.txt")
    name = "-".join(f"{k}{v}" for k, v in extra.items())
    ct = quantize_checkpoint(src, calib_ckpt / f"ct-{name}", calib=calib, **CALIB, **extra)
    fake = quantize_checkpoint(src, calib_ckpt / f"fake-{name}", calib=calib, format="fake", **CALIB, **extra)
    assert ct.widths == fake.widths and not ct.fallbacks
    t = tokens(2, 16)
    a, b, base = _logits(calib_ckpt / f"ct-{name}", t), _logits(calib_ckpt / f"fake-{name}", t), _logits(src, t)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
    assert (b - base).abs().max() > 1e-3  # something was quantized
    cfg = json.loads((calib_ckpt / f"ct-{name}" / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(cfg)
    assert cfg["quant_method"] == "compressed-tensors" and "lm_head" in cfg["ignore"]


def test_compressed_tensors_output_loads_in_the_asked_dtype(calib_ckpt):
    """transformers decompresses the fused experts of a compressed-tensors checkpoint in the
    scales' dtype (bf16) even when float32 is asked: load_model casts them (a GPU refuses
    float32 x bf16 products), and the logits are those of the same weights stored plainly."""
    from moecompress.checkpoint import load_model, save_model

    bf16 = calib_ckpt / "tiny-bf16"  # scales in bf16, as published checkpoints store them
    save_model(load_model(calib_ckpt / "tiny", dtype="float32").to(torch.bfloat16), bf16, source=calib_ckpt / "tiny")
    out = calib_ckpt / "ct-dtype"
    quantize_checkpoint(bf16, out, quantizer="rtn", scheme="w4a16", group_size=8, progress=False)
    fake = calib_ckpt / "fake-dtype"  # the same dequantized weights, stored plainly
    quantize_checkpoint(bf16, fake, quantizer="rtn", scheme="w4a16", group_size=8, progress=False, format="fake")
    model = load_model(out, dtype="float32")
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    t = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(t).logits, _logits(fake, t), atol=1e-5, rtol=0)


def test_on_disk_bytes_are_the_counted_bits(calib_ckpt):
    from moecompress.info import model_info

    out = calib_ckpt / "bytes"
    res = quantize_checkpoint(calib_ckpt / "tiny", out, quantizer="rtn", scheme="w4a16", group_size=8, progress=False)
    info = model_info(out)["quantization"]
    shape_bytes = 8 * 2 * 3 * 8 * 2  # weight_shape: int64[2] per matrix, 3 matrices x 8 experts x 2 layers
    assert info["expert_bits_per_weight"] * res.expert_weights / 8 == pytest.approx(res.total_bits / 8 + shape_bytes)
    assert json.loads((out / "moecompress.json").read_text())["loads_in"]["transformers"] == "yes"


def test_mixed_layer_widths_pack_each_layer_by_its_group(calib_ckpt):
    """transformers dequantizes all experts with one group (documented); compressed-tensors'
    own decompression, group by group, gives back exactly the fake weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    out = calib_ckpt / "mixed"
    res = quantize_checkpoint(calib_ckpt / "tiny", out, quantizer="rtn", granularity="layer", bits=6, symmetric=False,
                              candidates=[4, 8], calib=str(calib_ckpt / "calib.txt"), **CALIB)
    assert sorted({v[0] for v in res.widths.values()}) == [4, 8]
    rec = json.loads((out / "moecompress.json").read_text())
    assert rec["loads_in"]["transformers"].startswith("no")
    assert rec["bit_map"] == "bit_map.png" and (out / "bit_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    sd = load_file(out / "model.safetensors")
    import re

    for li, ws in res.widths.items():
        key = f"model.layers.{li}.mlp.experts.3.down_proj"
        group = next(g for g in qc.config_groups.values() if any(re.match(t[3:], key) for t in g.targets))
        assert group.weights.num_bits == ws[0]
        comp = BaseCompressor.get_value_from_registry(group.format)
        dense = comp.decompress({k.removeprefix(key + "."): v for k, v in sd.items() if k.startswith(key + ".")}, group)
        model = tiny_model("qwen3_moe")
        expect = rtn(model.model.layers[li].mlp.experts.down_proj[3], weight_args(ws[0], 8, False), torch.float32)[0]
        torch.testing.assert_close(dense["weight"].float(), expect, atol=0, rtol=0)


def test_every_family_quantizes_and_reloads(family, tmp_path):
    src = tmp_path / "src"
    model = tiny_checkpoint(src, family)
    t = tokens(2, 10)
    ref = tiny_model(family)
    quantize_model(ref, quantizer="rtn", scheme="w4a16", group_size=8, format="fake", progress=False)
    with torch.no_grad():
        expect = ref(t).logits
    opts = dict(quantizer="rtn", scheme="w4a16", group_size=8, progress=False)
    quantize_checkpoint(src, tmp_path / "fake", format="fake", **opts)
    torch.testing.assert_close(_logits(tmp_path / "fake", t), expect, atol=1e-3, rtol=0)
    if family in FUSED:
        with pytest.raises(MoECompressError, match="fused"):
            quantize_checkpoint(src, tmp_path / "ct", **opts)
    else:
        quantize_checkpoint(src, tmp_path / "ct", **opts)
        torch.testing.assert_close(_logits(tmp_path / "ct", t), expect, atol=1e-3, rtol=0)
    del model


def test_cli_quantize_and_refusals(calib_ckpt):
    out = calib_ckpt / "cli"
    res = invoke_cli("quantize", calib_ckpt / "tiny", "-o", out, "--quantizer", "rtn", "--scheme", "w8a16",
                     "--group-size", "8", "--json", calib_ckpt / "cli.json")
    assert res.exit_code == 0, res.output
    assert json.loads((calib_ckpt / "cli.json").read_text())["layer_widths"] == {"1": 8, "2": 8}
    res = invoke_cli("quantize", calib_ckpt / "tiny", "-o", calib_ckpt / "x", "--granularity", "expert", "--bits", "3")
    assert res.exit_code == 2 and "--format fake" in res.output and "Traceback" not in res.output
    res = invoke_cli("quantize", calib_ckpt / "tiny", "-o", calib_ckpt / "g5", "--quantizer", "rtn", "--group-size", "5")
    assert res.exit_code == 0 and "note: --group-size 5 does not divide" in res.output, res.output
    record = json.loads((calib_ckpt / "g5" / "moecompress.json").read_text())
    assert record["parameters"]["group_size"] == 0 and record["notes"]
    res = invoke_cli("info", out)
    assert res.exit_code == 0 and "expert bits per weight" in res.output


def test_info_says_bitsandbytes_left_the_experts_alone(tmp_path):
    from moecompress.info import model_info

    model = tiny_model("qwen3_moe")
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    model.save_pretrained(tmp_path / "bnb")
    q = model_info(tmp_path / "bnb")["quantization"]
    assert q["experts_quantized"] is False and "1849" in q["note"]
    assert q["expert_bits_per_weight"] == 32.0  # the experts are stored as they were (fp32 here)


def test_check_reads_compressed_tensors_shapes(calib_ckpt):
    from safetensors.torch import load_file, save_file

    from moecompress.check import check_checkpoint

    out = calib_ckpt / "checked"
    quantize_checkpoint(calib_ckpt / "tiny", out, quantizer="rtn", bits=3, symmetric=False, group_size=8, progress=False)
    assert check_checkpoint(out).ok  # also checked before the output was renamed into place
    sd = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.experts.2.up_proj.weight_packed"
    sd[key] = sd[key][:, :-1].contiguous()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    report = check_checkpoint(out)
    assert not report.ok and report.problems[0].startswith(key)
    del sd["model.layers.1.mlp.experts.2.up_proj.weight_scale"]
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    assert any("without its weight_scale" in p for p in check_checkpoint(out).problems)


def test_scales_are_stored_in_the_checkpoint_dtype(tmp_path):
    """Computed in float32, a bf16 checkpoint's scales stay bf16 (and are counted as 16 bits)."""
    from safetensors import safe_open

    tiny_checkpoint(tmp_path / "bf16", "qwen3_moe", dtype=torch.bfloat16)
    res = quantize_checkpoint(tmp_path / "bf16", tmp_path / "q", quantizer="rtn", scheme="w4a16", group_size=8,
                              progress=False)
    assert res.scale_bits == 16 and res.average_bits == pytest.approx(4 + 16 / 8)
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.1.mlp.experts.0.up_proj.weight_scale").get_dtype() == "BF16"


def test_bit_map_gives_each_width_its_own_colour_and_the_same_bytes_twice(tmp_path):
    """bit_map.png (written by quantize when an allocation chose the widths): every expert's cell
    holds the index of its width among those used (bits ascending, then fp8); the picture has no
    version stamp, so the same widths give the same bytes."""
    from moecompress.quantize.bitmap import plot_bit_map, width_grid

    widths = {3: [8, "fp8", 2, 2], 1: [4, 4, 16, 8]}
    layers, kinds, grid = width_grid(widths)
    assert layers == [1, 3] and kinds == [2, 4, 8, 16, "fp8"]
    assert grid == [[1, 1, 3, 2], [2, 4, 0, 0]]
    a, b = plot_bit_map(widths, tmp_path / "a.png"), plot_bit_map(widths, tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes() and b"matplotlib" not in a.read_bytes()


def test_uniform_quantize_draws_no_bit_map(calib_ckpt):
    out = calib_ckpt / "uniform_nomap"
    quantize_checkpoint(calib_ckpt / "tiny", out, quantizer="rtn", scheme="w8a16", group_size=8, progress=False)
    assert not (out / "bit_map.png").exists()
    assert "bit_map" not in json.loads((out / "moecompress.json").read_text())
