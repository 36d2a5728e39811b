"""Recompute the routed experts' activations for one batch, grouped per expert.

The model's fused expert module does not expose per-expert activations, so the statistics
that need them (EAN, REAP, EASY-EP, super-expert maxima) recompute them once per batch: the
(token, expert) routing pairs are sorted by expert, padded into a [E, C, H] block (C = the
largest per-expert token count) and run through every expert with batched matmuls. Experts
are processed in chunks so the padded block stays under ``max_elements`` (on CPU one expert
at a time, sliced without padding). Only routed pairs
are computed (T x k rows, never T x E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import MoELayer, Routing


@dataclass
class RoutedActivations:
    """Per routed (token, expert) pair, in expert-sorted order (P = T x k pairs)."""

    expert: torch.Tensor  # [P] expert index
    token: torch.Tensor  # [P] token index in the batch
    weight: torch.Tensor  # [P] routing weight (float32)
    out_norm: torch.Tensor  # [P] ||expert output|| (float32), the output as computed in the forward
    contribution_norm: torch.Tensor  # [P] ||weighted contribution to the layer output|| (float32)
    in_absmax: torch.Tensor  # [E] per expert: max |down_proj input| over its routed tokens (float32)
    out_absmax: torch.Tensor  # [E] per expert: max |down_proj output| over its routed tokens (float32)
    routed_output: torch.Tensor | None = None  # [T, H] sum of the routed experts' contributions


def _batched_expert(layer: MoELayer, xs: torch.Tensor, e0: int, e1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Down-proj input [n, C, I] and output [n, C, H] of experts e0..e1-1 on padded inputs xs [n, C, H]."""
    gb, ub, db = layer.expert_biases
    g = torch.bmm(xs, layer.gate_proj[e0:e1].transpose(1, 2))
    u = torch.bmm(xs, layer.up_proj[e0:e1].transpose(1, 2))
    if gb is not None:
        g, u = g + gb[e0:e1, None, :], u + ub[e0:e1, None, :]
    h = layer._act(g, u)
    out = torch.bmm(h, layer.down_proj[e0:e1].transpose(1, 2))
    if db is not None:
        out = out + db[e0:e1, None, :]
    return h, out


def _absmax(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |t| (over ``dim``, or everything) in float32."""
    m = t.abs().amax() if dim is None else t.abs().amax(dim=dim)
    return m.float()


def default_max_elements(device: torch.device) -> int:
    """CPU: one expert at a time (exact sizes, no padding waste); GPU: pad experts into few
    large batched matmuls (kernel launches dominate there)."""
    return 0 if torch.device(device).type == "cpu" else 1 << 26


_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_BROKEN: set = set()  # (device type, dtype) where grouped_mm failed once


def _gmm_weight(t: torch.Tensor, dtype) -> torch.Tensor:
    """[E, K, N] operand for grouped_mm, which needs one of the last two dims contiguous
    (GPT-OSS's interleaved gate/up views are strided: copied then)."""
    t = t.to(dtype)
    return t if 1 in (t.stride(-1), t.stride(-2)) else t.contiguous()


def _grouped_expert(layer: MoELayer, xin: torch.Tensor, expert: torch.Tensor, offs: torch.Tensor):
    """Down-proj input [P, I] and output [P, H] of expert-sorted rows xin [P, H] with one
    grouped matmul per projection (no host synchronisation, no padding)."""
    gb, ub, db = layer.expert_biases
    w = xin.dtype
    g = _GROUPED_MM(xin, _gmm_weight(layer.gate_proj.transpose(1, 2), w), offs=offs)
    u = _GROUPED_MM(xin, _gmm_weight(layer.up_proj.transpose(1, 2), w), offs=offs)
    if gb is not None:
        g, u = g + gb[expert], u + ub[expert]
    h = layer._act(g, u)
    out = _GROUPED_MM(h, _gmm_weight(layer.down_proj.transpose(1, 2), w), offs=offs)
    if db is not None:
        out = out + db[expert]
    return h, out


def routed_activations(layer: MoELayer, x: torch.Tensor, routing: Routing,
                       max_elements: int | None = None, want_routed_output: bool = False,
                       grouped_mm: bool | None = None) -> RoutedActivations:
    """Activations of every routed (token, expert) pair of x [T, H] under ``routing``.

    ``grouped_mm`` (default: on CUDA when torch has it): the whole layer in three grouped
    matmuls with no host synchronisation. Otherwise experts are computed in padded chunks of at
    most ``max_elements`` (default: one expert at a time on CPU, no padding).
    """
    T, k = routing.topk_idx.shape
    E = layer.num_experts
    flat_e = routing.topk_idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    expert = flat_e[order]
    token = torch.div(order, k, rounding_mode="floor")
    weight = routing.topk_weight.reshape(-1)[order].float()
    counts = torch.zeros(E, dtype=torch.long, device=x.device).index_add_(0, expert, torch.ones_like(expert))

    # Llama-4 scales the expert *input* by the routing weight: the forward's expert sees w * x.
    xin = x[token]
    if layer.spec.weight_on_input:
        xin = xin * weight[:, None].to(x.dtype)

    P = expert.numel()
    out_norm = torch.empty(P, dtype=torch.float32, device=x.device)
    in_absmax = torch.zeros(E, dtype=torch.float32, device=x.device)
    out_absmax = torch.zeros_like(in_absmax)
    routed = torch.zeros_like(x) if want_routed_output else None

    def reduce_rows(lo, hi, h_sel, o_sel, per_row_max: bool):
        if per_row_max:
            in_absmax.scatter_reduce_(0, expert[lo:hi], _absmax(h_sel, dim=1), "amax")
            out_absmax.scatter_reduce_(0, expert[lo:hi], _absmax(o_sel, dim=1), "amax")
        out_norm[lo:hi] = torch.linalg.vector_norm(o_sel, dim=1, dtype=torch.float32)
        if routed is not None:
            contrib = o_sel if layer.spec.weight_on_input else o_sel * weight[lo:hi, None].to(o_sel.dtype)
            routed.index_add_(0, token[lo:hi], contrib.to(x.dtype))

    key = (x.device.type, x.dtype)
    if grouped_mm is None:
        grouped_mm = max_elements is None and x.device.type == "cuda"
    if grouped_mm and _GROUPED_MM is not None and key not in _GROUPED_MM_BROKEN:
        try:
            h, out = _grouped_expert(layer, xin, expert, torch.cumsum(counts, 0).to(torch.int32))
        except (RuntimeError, NotImplementedError):  # dtype / layout the kernel does not take
            _GROUPED_MM_BROKEN.add(key)
        else:
            reduce_rows(0, P, h, out, per_row_max=True)
            return _result(layer, expert, token, weight, out_norm, in_absmax, out_absmax, routed)
    if max_elements is None:
        max_elements = default_max_elements(x.device)

    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(P, device=x.device) - starts[expert]
    counts_cpu = counts.tolist()
    starts_cpu = starts.tolist()
    width = max(layer.hidden_size, layer.intermediate_size)
    e0 = 0
    while e0 < E:
        # grow the chunk while the padded block fits the element budget
        e1, cmax = e0 + 1, max(counts_cpu[e0], 1)
        while e1 < E and (e1 + 1 - e0) * max(cmax, counts_cpu[e1]) * width <= max_elements:
            cmax = max(cmax, counts_cpu[e1])
            e1 += 1
        lo, hi = starts_cpu[e0], starts_cpu[e1 - 1] + counts_cpu[e1 - 1]
        if hi > lo:
            if e1 - e0 == 1:  # one expert: its pairs are contiguous, no padding needed
                h, out = _batched_expert(layer, xin[lo:hi][None], e0, e1)
                h_sel, o_sel = h[0], out[0]
                in_absmax[e0] = _absmax(h_sel)
                out_absmax[e0] = _absmax(o_sel)
                reduce_rows(lo, hi, h_sel, o_sel, per_row_max=False)
            else:
                local_e = expert[lo:hi] - e0
                local_p = pos[lo:hi]
                xs = x.new_zeros(e1 - e0, cmax, x.shape[1])
                xs[local_e, local_p] = xin[lo:hi]
                h, out = _batched_expert(layer, xs, e0, e1)
                reduce_rows(lo, hi, h[local_e, local_p], out[local_e, local_p], per_row_max=True)
        e0 = e1
    return _result(layer, expert, token, weight, out_norm, in_absmax, out_absmax, routed)


def _result(layer, expert, token, weight, out_norm, in_absmax, out_absmax, routed) -> RoutedActivations:
    contribution = out_norm if layer.spec.weight_on_input else out_norm * weight.abs()
    return RoutedActivations(expert=expert, token=token, weight=weight, out_norm=out_norm,
                             contribution_norm=contribution, in_absmax=in_absmax, out_absmax=out_absmax,
                             routed_output=routed)
