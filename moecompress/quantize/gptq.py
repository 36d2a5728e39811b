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
    """One matrix: (dequantized W float32, qparams). Raises :class:`CholeskyFailed`."""
    out, qps, ok = gptq_batch(w[None], hessian[None], args, store_dtype, damp=damp, block=block)
    if not ok[0]:
        raise CholeskyFailed("the dampened Hessian is not positive definite")
    return out[0], qps[0]


@torch.no_grad()
def gptq_batch(ws: torch.Tensor, hessians: torch.Tensor, args: QuantizationArgs, store_dtype: torch.dtype, *,
               damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, list[QParams], list[bool]]:
    """GPTQ of B matrices at once (the experts of a layer): ``ws`` [B, out, in], ``hessians``
    [B, in, in]. Every step is the single-matrix algorithm with a leading batch dimension, so the
    column loop runs once per layer instead of once per expert. Returns the dequantized weights,
    each matrix's qparams and whether its Cholesky factorisation succeeded (if not, its result is
    to be discarded: the caller rounds that matrix to nearest)."""
    W = ws.detach().float().clone()
    H = hessians.detach().float().clone()
    B, rows, cols = W.shape
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0  # [B, cols]
    diag[dead] = 1.0
    diag += damp * diag.mean(-1, keepdim=True)
    L, info = torch.linalg.cholesky_ex(H)
    ok = info == 0
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    L = torch.where(ok[:, None, None], L, eye)  # failed ones proceed on the identity, then are discarded
    Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    ok &= (info == 0) & torch.isfinite(Hinv).flatten(1).all(1)
    Hinv = torch.where(ok[:, None, None], Hinv, eye)
    lo, hi = (float(v) for v in calculate_range(args, W.device))
    grouped = args.strategy == "group"
    group = args.group_size if grouped else cols
    row_args = _channel(args)
    if grouped:  # blocks hold whole groups, so a group's grid is taken from fully updated weights
        block = group * max(1, block // group)
        scale = torch.empty(B, rows, cols // group, device=W.device)
        zp = torch.empty(B, rows, cols // group, dtype=torch.int8, device=W.device)
    else:  # one grid per output channel, from the weights before any update (as the reference)
        q0 = qparams(W.reshape(B * rows, cols), row_args, store_dtype)
        scale, zp = q0.scale.reshape(B, rows, 1), q0.zero_point.reshape(B, rows, 1)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            g = c // group
            if grouped and c % group == 0:
                q = qparams(W1[:, :, i:i + group].reshape(B * rows, group), row_args, store_dtype)
                scale[:, :, g], zp[:, :, g] = q.scale.reshape(B, rows), q.zero_point.reshape(B, rows)
            qcol = _round(W1[:, :, i], scale[:, :, g], zp[:, :, g].float(), lo, hi)
            Q[:, :, c] = qcol
            err = (W1[:, :, i] - qcol) / Hinv1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]
    outs, qps = [], []
    for b in range(B):
        qp = QParams(scale[b], zp[b])
        out = dequantized(Q[b], qp, args)  # the same values through compressed-tensors (idempotent on the grid)
        if dead[b].any():  # columns no token reached: round-to-nearest (see the module docstring)
            out[:, dead[b]] = dequantized(ws[b].float(), qp, args)[:, dead[b]]
        outs.append(out)
        qps.append(qp)
    return torch.stack(outs), qps, ok.tolist()

def _channel(args: QuantizationArgs) -> QuantizationArgs:
    """The same grid with one group per row (used on one group's columns)."""
    return QuantizationArgs(num_bits=args.num_bits, type=args.type, symmetric=args.symmetric, strategy="channel")
