"""Stored weight formats of published checkpoints: plain, block-wise FP8, MXFP4.

Published MoE checkpoints often store weights quantized, with names transformers does not
build but loads through its quantizers:

* **block-wise FP8** (DeepSeek-V3/R1, Qwen3-*-FP8, GLM-4.5-FP8; transformers'
  ``FineGrainedFP8Config``, ``quant_method: fp8``): a linear's ``X.weight`` is
  ``float8_e4m3fn`` and ``X.weight_scale_inv`` holds one float32 scale per
  ``weight_block_size`` block (128x128): shape ``[ceil(out/128), ceil(in/128)]``.
* **MXFP4** (GPT-OSS; ``Mxfp4Config``, ``quant_method: mxfp4``): a fused expert tensor ``P``
  of transformers' shape ``[E, in, out]`` is stored as ``P_blocks`` (uint8 ``[E, out, in/32, 16]``,
  two 4-bit values a byte) and ``P_scales`` (uint8 E8M0 exponents ``[E, out, in/32]``).

Both keep the expert dimension of the tensor they quantize (per-expert keys for FP8, dim 0
for MXFP4), so whole-expert surgery slices the stored tensors and never dequantizes. Compute
stages load the model dequantized (:func:`dequantized_loading`); stages that rewrite weights
(merge, fine-grained) write bf16 (README: "Quantized inputs").
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch

from .errors import MoECompressError

FP8_SCALE = "weight_scale_inv"  # sibling of X.weight
FP8_OPTIONAL = ("activation_scale", "input_scale")  # static activation scales some checkpoints add
MXFP4_PARTS = ("_blocks", "_scales")  # suffixes of a fused tensor P
# compressed-tensors (``quant_method: compressed-tensors``, what ``moecompress quantize`` writes):
# a linear's ``X.weight`` becomes these siblings (pack-quantized) or stays ``X.weight`` (FP8) with
# ``X.weight_scale``; shapes follow from the config group whose ``targets`` name ``X``.
CT_PARTS = {"weight_packed": "ct_packed", "weight_scale": "ct_scale", "weight_zero_point": "ct_zero_point",
            "weight_shape": "ct_shape"}
_MXFP4_GROUP = 32


def quant_method(config) -> str | None:
    """``"fp8"``, ``"mxfp4"``, another method name, or None for a plain checkpoint."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    return (q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)) or None


def fp8_block(config) -> tuple[int, int]:
    q = config.quantization_config
    block = q.get("weight_block_size") if isinstance(q, dict) else getattr(q, "weight_block_size", None)
    return tuple(block) if block else (128, 128)


def logical_key(key: str, method: str | None) -> tuple[str, str]:
    """The key of the unquantized tensor a stored key belongs to, and its part:
    ``"weight"`` (the tensor itself, possibly quantized), ``"scale"`` (FP8 block scales),
    ``"activation_scale"``, ``"blocks"`` / ``"scales"`` (MXFP4)."""
    if method == "fp8":
        stem, _, last = key.rpartition(".")
        if last == FP8_SCALE:
            return f"{stem}.weight", "scale"
        if last in FP8_OPTIONAL:
            return f"{stem}.weight", "activation_scale"
    if method == "mxfp4":
        for suffix in MXFP4_PARTS:
            if key.endswith(suffix):
                return key[: -len(suffix)], suffix[1:]
    if method == "compressed-tensors":
        stem, _, last = key.rpartition(".")
        if last in CT_PARTS:
            return f"{stem}.weight", CT_PARTS[last]
    return key, "weight"


def stored_key(logical: str, part: str) -> str:
    """Inverse of :func:`logical_key`."""
    if part == "weight":
        return logical
    if part == "scale":
        return logical[: -len("weight")] + FP8_SCALE
    if part in ("blocks", "scales"):
        return f"{logical}_{part}"
    for name, p in CT_PARTS.items():
        if part == p:
            return logical[: -len("weight")] + name
    raise ValueError(part)


def stored_shape(part: str, shape: tuple[int, ...], config, logical: str | None = None) -> tuple[int, ...] | None:
    """Shape a part of a tensor of (transformers') ``shape`` has in the checkpoint; None if
    not fixed (optional activation scales)."""
    if part == "weight":
        return tuple(shape)
    if part == "scale":
        b0, b1 = fp8_block(config)
        return (*shape[:-2], math.ceil(shape[-2] / b0), math.ceil(shape[-1] / b1))
    if part in ("blocks", "scales"):
        e, n_in, n_out = shape
        groups = math.ceil(n_in / _MXFP4_GROUP)
        return (e, n_out, groups, 16) if part == "blocks" else (e, n_out, groups)
    if part.startswith("ct_") and logical is not None:
        return _ct_shape(part, shape, config, logical)
    return None


def _ct_shape(part: str, shape: tuple[int, ...], config, logical: str) -> tuple[int, ...] | None:
    """Stored shape of a compressed-tensors part of the [out, in] weight ``logical``, from the
    weight arguments of the config group whose ``re:`` targets name its module."""
    import re

    if part == "ct_shape":
        return (2,)
    q = config.quantization_config
    groups = (q.get("config_groups") if isinstance(q, dict) else getattr(q, "config_groups", None)) or {}
    module = logical[: -len(".weight")]
    args = next((g.get("weights") for g in groups.values()
                 if any(t.startswith("re:") and re.match(t[3:], module) for t in g.get("targets", []))), None)
    if not args:
        return None
    out, inp = shape[-2:]
    bits, cols = args["num_bits"], (args.get("group_size") or inp) if args.get("strategy") == "group" else inp
    if part == "ct_packed":
        return (out, math.ceil(inp * bits / 32))
    if part == "ct_scale":
        return (out, inp // cols)
    return (math.ceil(out * bits / 32), inp // cols)  # ct_zero_point, packed along the rows


DEQUANTIZED_METHODS = ("fp8", "mxfp4")  # what dequantized_loading loads as plain bf16 weights


def require_rewritable(config, name, stage: str) -> None:
    """A stage that writes new weights (merge, fine-grained pruning, distillation) computes on a
    quantized input dequantized (:func:`dequantized_loading`) and saves bf16. Other quantized
    formats (compressed-tensors, GPTQ, AWQ, ...) load in their own modules, whose save would
    compress the new weights with the input's scales (transformers raised "Undefined Operation"
    after the whole run): refused before any work, with what to do instead."""
    method = quant_method(config)
    if method is not None and method not in DEQUANTIZED_METHODS:
        raise MoECompressError(f"'{name}' is quantized ({method}); {stage} writes new weights, which cannot keep "
                               "its quantized format: run it on the checkpoint before quantization (then quantize "
                               "the result), or prune whole experts, which keeps the stored format")


def dequantized_loading(config) -> dict:
    """``from_pretrained`` keyword arguments that load a quantized checkpoint dequantized
    (bf16) on any device, so every stage computes through the plain MoE view; empty for a
    plain checkpoint. transformers does this itself on a CPU; on a GPU it would otherwise
    build FP8 / MXFP4 expert modules that the view cannot read."""
    method = quant_method(config)
    if method == "fp8":
        from transformers import FineGrainedFP8Config

        return {"quantization_config": FineGrainedFP8Config(weight_block_size=list(fp8_block(config)), dequantize=True)}
    if method == "mxfp4":
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}


@contextlib.contextmanager
def partial_fp8_blocks(config) -> Iterator[None]:
    """Let transformers' FP8 dequantizer read weights whose shape is not a multiple of the block.

    Why a patch: DeepSeek-V3/R1 store ``kv_a_proj_with_mqa`` as [576, 7168] FP8 with a [5, 56]
    ``weight_scale_inv`` grid (128x128 blocks, the last row block partial). transformers 5.17-5.24
    derive the block from ``shape // grid`` and raise "not divisible by scale grid" for it, so the
    published checkpoint does not load dequantized at all; and where the shape happens to divide
    by a grid of partial blocks (48 rows in 2 blocks of 24) it infers the wrong block (24 -> 16)
    and dequantizes silently wrong. So every FP8 weight whose grid is the configured block's
    (partial edge blocks allowed) goes through :func:`dequantize_fp8`, as DeepSeek's own
    ``weight_dequant`` computes it (equal to transformers' result where both apply; tested);
    anything else (e.g. MXFP4 blocks in the same checkpoint) keeps transformers' code. The
    original method is restored on exit."""
    if quant_method(config) != "fp8":
        yield
        return
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    block = fp8_block(config)
    original = Fp8Dequantize._dequantize_one

    def dequantize_one(self, quantized, scales, output_dtype=None):
        rows, cols = quantized.shape[-2:]
        grid = tuple(scales.shape[-2:]) if scales.dim() >= 2 else None
        # transformers 5.17 hands non-expert weights over already cast to the model's dtype (exact:
        # every e4m3 value is a bf16 value); packed FP4 (int8) keeps transformers' own code.
        if not quantized.is_floating_point() or grid != (math.ceil(rows / block[0]), math.ceil(cols / block[1])):
            return original(self, quantized, scales, output_dtype)
        if output_dtype is None:  # transformers' own default: the scales' dtype if it is a wide float
            output_dtype = scales.dtype if scales.dtype.is_floating_point and scales.element_size() >= 2 else torch.bfloat16
        return dequantize_fp8(quantized, scales, block, dtype=output_dtype)

    Fp8Dequantize._dequantize_one = dequantize_one
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = original


# ----- dequantization (statistics, tests) --------------------------------------------------
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                   dtype=torch.bfloat16) -> torch.Tensor:
    """``weight`` (FP8) times its per-``block`` ``scale_inv``; blocks at the edges may be partial."""
    rows, cols = weight.shape[-2:]
    b0, b1 = block
    s = scale_inv.float().repeat_interleave(b0, -2)[..., :rows, :].repeat_interleave(b1, -1)[..., :cols]
    return (weight.float() * s).to(dtype)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """MXFP4 ``blocks`` [E, out, G, 16] and E8M0 ``scales`` [E, out, G] -> [E, in, out]
    (transformers' layout of the fused expert tensor). Low nibble first."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)  # [E, out, G, 32]
    vals = torch.ldexp(vals, scales.to(torch.int32).sub(127).unsqueeze(-1))
    return vals.flatten(-2).transpose(1, 2).to(dtype).contiguous()


def quantize_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 (e4m3) as DeepSeek-V3 publishes it: scale_inv = amax / 448 per block."""
    rows, cols = weight.shape
    r, c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(r * block[0], c * block[1], dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(r, block[0], c, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / torch.finfo(torch.float8_e4m3fn).max, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).view(r * block[0], c * block[1])[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.float()


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] -> MXFP4 ``blocks`` [E, out, in/32, 16], ``scales`` [E, out, in/32] (OCP MX:
    a shared power-of-two scale per 32 values, 4-bit e2m1 elements, nearest value)."""
    e, n_in, n_out = w.shape
    x = w.float().transpose(1, 2).reshape(e, n_out, n_in // _MXFP4_GROUP, _MXFP4_GROUP)
    amax = x.abs().amax(-1).clamp_min(2.0**-126)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)  # e2m1's largest exponent is 2
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (torch.ldexp(x, -exp.to(torch.int32).unsqueeze(-1)).unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exp + 127).to(torch.uint8).contiguous()
