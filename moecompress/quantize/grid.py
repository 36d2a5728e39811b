"""Quantization grids through the compressed-tensors library, and honest bit accounting.

Every quantized value in moecompress is produced by compressed-tensors' own
``calculate_qparams`` / ``fake_quantize`` for the same ``QuantizationArgs`` that the written
``quantization_config`` declares, so a ``fake`` checkpoint holds exactly the weights a
``compressed-tensors`` loader dequantizes. Scales are rounded to the dtype they are stored in
(the checkpoint's) before any weight is quantized with them, for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

FP8 = "fp8"  # the float 8-bit width (per output channel, no calibration), as opposed to int widths 1..8


def weight_args(bits: int | str, group_size: int, symmetric: bool) -> QuantizationArgs:
    """The compressed-tensors weight arguments of one width: int ``bits`` in groups of
    ``group_size`` input columns (0 = one group per output channel), or ``"fp8"`` (per channel)."""
    if bits == FP8:
        return QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    if group_size:
        return QuantizationArgs(num_bits=int(bits), type="int", symmetric=symmetric, strategy="group",
                                group_size=group_size)
    return QuantizationArgs(num_bits=int(bits), type="int", symmetric=symmetric, strategy="channel")


@dataclass
class QParams:
    """Scale and zero point of one [out, in] matrix: [out, groups] each (groups = 1 per channel)."""

    scale: torch.Tensor
    zero_point: torch.Tensor


def groups_of(w: torch.Tensor, args: QuantizationArgs) -> torch.Tensor:
    """``w`` [out, in] as [out, groups, group_size]."""
    g = args.group_size if args.strategy == "group" else w.shape[1]
    if w.shape[1] % g:
        raise ValueError(f"input size {w.shape[1]} is not a multiple of the group size {g}")
    return w.reshape(w.shape[0], -1, g)


def qparams(w: torch.Tensor, args: QuantizationArgs, store_dtype: torch.dtype) -> QParams:
    """Min/max scale and zero point of ``w`` [out, in] (compressed-tensors' ``calculate_qparams``),
    the scale rounded to ``store_dtype``, the dtype the checkpoint stores it in."""
    r = groups_of(w.float(), args)
    scale, zp = calculate_qparams(r.amin(-1), r.amax(-1), args)
    return QParams(scale.to(store_dtype).float(), zp)


def dequantized(w: torch.Tensor, q: QParams, args: QuantizationArgs) -> torch.Tensor:
    """``w`` rounded to the grid of ``q`` and dequantized (float32), by compressed-tensors."""
    return fake_quantize(w.float(), q.scale, q.zero_point, args)


def rtn(w: torch.Tensor, args: QuantizationArgs, store_dtype: torch.dtype) -> tuple[torch.Tensor, QParams]:
    """Round-to-nearest: (dequantized weights float32, qparams)."""
    q = qparams(w, args, store_dtype)
    return dequantized(w, q, args), q


def matrix_bits(shape: tuple[int, int], bits: float | str, group_size: int, symmetric: bool, scale_bits: int) -> float:
    """Bits stored for one [out, in] matrix at width ``bits``: the weights, one scale per group
    (``scale_bits`` each, the checkpoint dtype) and, asymmetric, one zero point per group packed at
    the same width (compressed-tensors' pack-quantized layout). ``bits`` may be fractional (a budget)."""
    out, inp = shape
    if bits == FP8:
        return out * inp * 8 + out * scale_bits
    groups = inp // group_size if group_size else 1
    zp = 0 if symmetric else float(bits)
    return out * inp * float(bits) + out * groups * (scale_bits + zp)


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits
