"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023), Algorithm 1 with lazy batch updates.

For W [out, in] and the Hessian H = sum_t x_t x_t^T of the layer input (routed tokens of one
expert), columns are quantized left to right; each column's rounding error e is spread over the
not-yet-quantized columns with the Cholesky factor of H^-1 (Eq. 3 / Alg. 1), so the layer output on
the calibration tokens changes least. Dampening: H += damp * mean(diag H) * I. Group
quantization takes each group's scale and zero point from the (already updated) weights when its
first column is reached, as the reference implementation and llm-compressor do. Columns that no
token touched (diag H = 0) are zeroed by the reference; here they keep their round-to-nearest value
(the error they would add is not measured, and zero would change the weight for other tokens).

Written here rather than imported: llm-compressor's implementation is tied to its module
hooks, GPTQModel's to its own looper; this one works on a plain matrix and Hessian.
"""

from __future__ import annotations

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.utils import calculate_range

from .grid import QParams, dequantized, qparams


class CholeskyFailed(Exception):
    """H (dampened) is not positive definite: the caller falls back to round-to-nearest."""


def _round(col: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # compressed-tensors' quantize/dequantize formula on one column (called once per column, so
    # written out; the finished matrix is passed through compressed-tensors' fake_quantize once more).
    return (torch.clamp(torch.round(col / scale + zp), lo, hi) - zp) * scale


@torch.no_grad()
def gptq(w: torch.Tensor, hessian: torch.Tensor, args: QuantizationArgs, store_dtype: torch.dtype, *,
         damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, QParams]:
    """(dequantized W float32, qparams). Raises :class:`CholeskyFailed`."""
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        raise CholeskyFailed(str(e)) from None
    if not torch.isfinite(Hinv).all():
        raise CholeskyFailed("non-finite inverse Hessian")
    lo, hi = (float(v) for v in calculate_range(args, W.device))
    grouped = args.strategy == "group"
    group = args.group_size if grouped else cols
    if grouped:  # blocks hold whole groups, so a group's grid is taken from fully updated weights
        block = group * max(1, block // group)
        scale = torch.empty(rows, cols // group, device=W.device)
        zp = torch.empty(rows, cols // group, dtype=torch.int8, device=W.device)
    else:  # one grid per output channel, from the weights before any update (as the reference)
        q0 = qparams(W, args, store_dtype)
        scale, zp = q0.scale.clone(), q0.zero_point.clone()
    row_args = _channel(args)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            g = c // group
            if grouped and c % group == 0:
                q = qparams(W1[:, i:i + group], row_args, store_dtype)
                scale[:, g], zp[:, g] = q.scale[:, 0], q.zero_point[:, 0]
            qcol = _round(W1[:, i], scale[:, g], zp[:, g].float(), lo, hi)
            Q[:, c] = qcol
            err = (W1[:, i] - qcol) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    qp = QParams(scale, zp)
    out = dequantized(Q, qp, args)  # the same values, through compressed-tensors (idempotent on the grid)
    if dead.any():  # columns no token reached: round-to-nearest (see the module docstring)
        out[:, dead] = dequantized(w.float(), qp, args)[:, dead]
    return out, qp


def _channel(args: QuantizationArgs) -> QuantizationArgs:
    """The same grid with one group per row (used on one group's columns)."""
    return QuantizationArgs(num_bits=args.num_bits, type=args.type, symmetric=args.symmetric, strategy="channel")
