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
    offsets: torch.Tensor  # [E + 1] expert e owns pairs offsets[e]:offsets[e + 1]
    out_norm: torch.Tensor  # [P] ||expert output|| (float32), the output as computed in the forward
    row_in_max: torch.Tensor  # [P] max |down_proj input| of the pair (float32)
    row_out_max: torch.Tensor  # [P] max |down_proj output| of the pair (float32)
    row_out_top: torch.Tensor  # [P] max (signed) of the expert output of the pair (float32; REAP's max_activations)
    out_sum: torch.Tensor  # [E, H] per expert: sum of its outputs over its routed tokens (float64; REAP's ean_ca)
    weight_on_input: bool  # Llama-4: the routing weight scaled the input, not the output
    routed_output: torch.Tensor | None = None  # [T, H] sum of the routed experts' contributions

    @property
    def contribution_norm(self) -> torch.Tensor:
        """[P] ||weighted contribution to the layer output|| (float32)."""
        return self.out_norm if self.weight_on_input else self.out_norm * self.weight.abs()

    @property
    def in_absmax(self) -> torch.Tensor:
        """[E] per expert: max |down_proj input| over its routed tokens (float32)."""
        return _expert_max(self.row_in_max, self.expert, self.offsets.numel() - 1)

    @property
    def out_absmax(self) -> torch.Tensor:
        """[E] per expert: max |down_proj output| over its routed tokens (float32)."""
        return _expert_max(self.row_out_max, self.expert, self.offsets.numel() - 1)


def _expert_max(rows: torch.Tensor, expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    # amax is order-free: deterministic even with atomics
    return torch.zeros(num_experts, dtype=rows.dtype, device=rows.device).scatter_reduce_(0, expert, rows, "amax")


def _row_absmax(t: torch.Tensor) -> torch.Tensor:
    """max |t| per row in float32: one kernel on a GPU; on the CPU vector_norm(inf) is ~20x
    slower than abs().amax() (measured, torch 2.13)."""
    if t.is_cuda:
        return torch.linalg.vector_norm(t, ord=float("inf"), dim=1, dtype=torch.float32)
    return t.abs().amax(dim=1).float() if t.shape[1] else t.new_zeros(t.shape[0], dtype=torch.float32)


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

    Every reduction is deterministic (no floating-point atomics): per-expert offsets come from
    ``searchsorted`` on the expert-sorted pairs, and the routed output is un-sorted and summed
    over the k slots of each token, the way transformers' own grouped experts forward does it.
    Per-expert reductions are left to the caller (the statistics do them for all layers at once).
    """
    T, k = routing.topk_idx.shape
    E = layer.num_experts
    dev = x.device
    expert, order = torch.sort(routing.topk_idx.reshape(-1), stable=True)
    token = torch.div(order, k, rounding_mode="floor")
    weight = routing.topk_weight.reshape(-1)[order].float()
    offsets = torch.searchsorted(expert, _arange(E + 1, dev))  # [E + 1]: expert e owns rows offsets[e]:offsets[e+1]

    # Llama-4 scales the expert *input* by the routing weight: the forward's expert sees w * x.
    xin = x[token]
    if layer.spec.weight_on_input:
        xin = xin * weight[:, None].to(x.dtype)

    P = expert.numel()
    row_in_max = torch.empty(P, dtype=torch.float32, device=dev)  # max |down_proj input| of each row
    row_out_max = torch.empty_like(row_in_max)
    out_norm = torch.empty_like(row_in_max)
    row_out_top = torch.empty_like(row_in_max)
    out_sum = torch.zeros(E, x.shape[1], dtype=torch.float64, device=dev)
    contrib = None  # [P, H] weighted expert outputs, expert-sorted (GPU)
    # On the CPU, index_add_ adds in a fixed order (deterministic) and saves a [P, H] buffer and
    # its gather; on a GPU its float atomics would not be, so the rows are un-sorted and summed.
    routed_cpu = x.new_zeros(T, x.shape[1]) if want_routed_output and dev.type == "cpu" else None

    def weighted(lo, hi, o):
        return o if layer.spec.weight_on_input else o * weight[lo:hi, None].to(o.dtype)

    def reduce_rows(lo, hi, h, o):
        nonlocal contrib
        row_in_max[lo:hi] = _row_absmax(h)
        row_out_max[lo:hi] = _row_absmax(o)
        out_norm[lo:hi] = torch.linalg.vector_norm(o, dim=1, dtype=torch.float32)
        row_out_top[lo:hi] = o.amax(dim=1).float() if o.shape[1] else 0.0
        out_sum.add_(_segment_rows(o, offsets, lo, hi))
        if not want_routed_output:
            return
        if routed_cpu is not None:
            routed_cpu.index_add_(0, token[lo:hi], weighted(lo, hi, o).to(x.dtype))
        elif lo == 0 and hi == P:  # the whole layer at once (grouped matmuls): no buffer copy
            contrib = weighted(lo, hi, o)
        else:
            if contrib is None:
                contrib = x.new_zeros(P, x.shape[1])
            contrib[lo:hi] = weighted(lo, hi, o)

    key = (dev.type, x.dtype)
    if grouped_mm is None:
        grouped_mm = max_elements is None and dev.type == "cuda"
    done = False
    if grouped_mm and _GROUPED_MM is not None and key not in _GROUPED_MM_BROKEN:
        try:
            h, out = _grouped_expert(layer, xin, expert, offsets[1:].to(torch.int32))
        except (RuntimeError, NotImplementedError):  # dtype / layout the kernel does not take
            _GROUPED_MM_BROKEN.add(key)
        else:
            reduce_rows(0, P, h, out)
            done = True
    if not done:
        _chunked_experts(layer, x, xin, expert, offsets, max_elements, reduce_rows)

    routed = routed_cpu
    if want_routed_output and routed is None:
        if contrib is None:  # no routed pairs at all
            contrib = x.new_zeros(P, x.shape[1])
        inverse = torch.empty_like(order)
        inverse[order] = _arange(P, dev)
        # sum over the k slots in fp32, then cast: what transformers' experts forward does
        routed = contrib[inverse].view(T, k, -1).sum(dim=1, dtype=torch.float32).to(x.dtype)
    return RoutedActivations(expert=expert, token=token, weight=weight, offsets=offsets, out_norm=out_norm,
                             row_in_max=row_in_max, row_out_max=row_out_max, row_out_top=row_out_top,
                             out_sum=out_sum, weight_on_input=bool(layer.spec.weight_on_input), routed_output=routed)


def _segment_rows(o: torch.Tensor, offsets: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[E, H] float64 per-expert sums of expert-sorted rows ``o`` = rows lo:hi of all pairs: a
    prefix sum read at the expert boundaries (deterministic, no float atomics on a GPU)."""
    c = torch.nn.functional.pad(o.double().cumsum(0), (0, 0, 1, 0))
    bounds = offsets.clamp(lo, hi) - lo
    return c[bounds[1:]] - c[bounds[:-1]]


def _chunked_experts(layer, x, xin, expert, offsets, max_elements, reduce_rows) -> None:
    """Experts in padded chunks of at most ``max_elements`` (one expert per chunk: no padding)."""
    E = layer.num_experts
    if max_elements is None:
        max_elements = default_max_elements(x.device)
    starts_cpu = offsets.tolist()
    counts_cpu = [b - a for a, b in zip(starts_cpu[:-1], starts_cpu[1:])]
    width = max(layer.hidden_size, layer.intermediate_size)
    e0 = 0
    while e0 < E:
        # grow the chunk while the padded block fits the element budget
        e1, cmax = e0 + 1, max(counts_cpu[e0], 1)
        while e1 < E and (e1 + 1 - e0) * max(cmax, counts_cpu[e1]) * width <= max_elements:
            cmax = max(cmax, counts_cpu[e1])
            e1 += 1
        lo, hi = starts_cpu[e0], starts_cpu[e1]
        if hi > lo:
            if e1 - e0 == 1:  # one expert: its pairs are contiguous, no padding needed
                h, out = layer.experts_forward(xin[lo:hi][None], e0, e1)
                reduce_rows(lo, hi, h[0], out[0])
            else:
                local_e = expert[lo:hi] - e0
                local_p = torch.arange(lo, hi, device=x.device) - offsets[expert[lo:hi]]
                xs = x.new_zeros(e1 - e0, cmax, x.shape[1])
                xs[local_e, local_p] = xin[lo:hi]
                h, out = layer.experts_forward(xs, e0, e1)
                reduce_rows(lo, hi, h[local_e, local_p], out[local_e, local_p])
        e0 = e1


_ARANGE: dict = {}


def _arange(n: int, device) -> torch.Tensor:
    """Cached ``arange(n)`` (int64) per device: saves a kernel launch per layer and batch."""
    key = (n, str(device))
    t = _ARANGE.get(key)
    if t is None:
        if len(_ARANGE) > 64:
            _ARANGE.clear()
        t = _ARANGE[key] = torch.arange(n, device=device)
    return t
