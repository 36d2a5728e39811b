"""What one MoE layer's calibration traffic tells the quantizer, and the quantization of its experts.

:class:`ExpertTraffic` observes one MoE layer (``capture`` observer protocol) and keeps, per
expert: the GPTQ Hessians of its two inputs (gate/up see the token, down sees the expert's hidden
activation), the routed token count, MC-MoE's activation frequency (top-k hits) and activation
weight (routing probability before top-k renormalisation, summed), and a sample of the layer's
tokens with their routing, from which the output loss of a quantized expert is measured.

GPTQ's Hessian of an expert comes from the tokens routed to it; with ``calibrate_all_experts``
every calibration token goes into every expert's Hessian (llm-compressor's default for MoE), while
the layer output that the next layers see is the model's own routed output either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..arch import MoELayer
from .gptq import gptq_batch
from .grid import QParams, rtn, weight_args

PARTS = ("gate", "up", "down")


class ExpertTraffic:
    def __init__(self, layer: MoELayer, *, hessians: bool, all_experts: bool = False, sample_tokens: int = 0,
                 sample_per_batch: int = 0, seed: int = 0):
        E = layer.num_experts
        self.layer_idx = layer.layer_idx
        self.hessians, self.all_experts, self.sample_tokens = hessians, all_experts, sample_tokens
        self.sample_per_batch = sample_per_batch or sample_tokens
        self.count = torch.zeros(E, dtype=torch.long)
        self.freq = torch.zeros(E, dtype=torch.float64)
        self.weight = torch.zeros(E, dtype=torch.float64)
        self.h_in: dict[int, torch.Tensor] = {}
        self.h_down: dict[int, torch.Tensor] = {}
        self.sample: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._seen = 0
        self._gen = torch.Generator().manual_seed(seed)

    def reads_weights(self, layer: MoELayer) -> bool:
        return layer.layer_idx == self.layer_idx and self.hessians

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: torch.Tensor, routing, y: torch.Tensor) -> None:
        if layer.layer_idx != self.layer_idx:
            return
        E = layer.num_experts
        idx = routing.topk_idx
        hits = torch.bincount(idx.flatten().cpu(), minlength=E)
        self.count += hits
        self.freq += hits.double()
        # MC-MoE's activation weight: the routing probability of the tokens that selected the expert,
        # before the top-k renormalisation (the authors' ``weights_tensor``)
        picked = routing.probs.double().gather(1, idx)
        self.weight += torch.zeros(E, dtype=torch.float64).scatter_add_(0, idx.flatten().cpu(), picked.flatten().cpu())
        if self.sample_tokens:
            self._keep_sample(x, routing)
        if not self.hessians:
            return
        dense = routing.dense_weights(E)
        for e in range(E):
            tok = torch.arange(x.shape[0], device=x.device) if self.all_experts else (idx == e).any(1).nonzero().flatten()
            if tok.numel() == 0:
                continue
            xe = x.index_select(0, tok)
            if layer.spec.weight_on_input and not self.all_experts:  # Llama-4: the expert sees x * weight
                xe = xe * dense[tok, e][:, None].to(xe.dtype)
            xf = xe.float()
            h = layer.expert_hidden(e, xe).float()
            self._add(self.h_in, e, xf.T @ xf)
            self._add(self.h_down, e, h.T @ h)

    @staticmethod
    def _add(store: dict, e: int, m: torch.Tensor) -> None:
        if e in store:
            store[e] += m
        else:
            store[e] = m.clone()

    def _keep_sample(self, x: torch.Tensor, routing) -> None:
        # A seeded share of every batch, so the sample covers the calibration text evenly.
        left = self.sample_tokens - self._seen
        if left <= 0:
            return
        take = min(left, self.sample_per_batch, x.shape[0])
        pick = torch.randperm(x.shape[0], generator=self._gen)[:take].sort().values.to(x.device)
        self.sample.append((x.index_select(0, pick).cpu(), routing.topk_idx.index_select(0, pick).cpu(),
                            routing.topk_weight.index_select(0, pick).float().cpu()))
        self._seen += take


@dataclass
class QuantizedExpert:
    weights: dict[str, torch.Tensor]  # canonical part -> dequantized float32
    qparams: dict[str, QParams]
    how: str  # "gptq", "rtn", or "rtn (fallback: ...)"


_HESSIAN_BYTES = 1 << 31  # Hessian-sized float32 buffers (about 4 per matrix) of one GPTQ batch


@torch.no_grad()
def quantize_experts(layer: MoELayer, widths: dict[int, object], traffic: ExpertTraffic | None, *, quantizer: str,
                     group_size: int, symmetric: bool, store_dtype: torch.dtype, damp: float,
                     min_tokens: int) -> dict[int, QuantizedExpert]:
    """Experts ``widths`` (expert -> int bits or "fp8") of ``layer``; the layer is not edited.
    GPTQ runs the experts of one width together (``gptq_batch``); an expert without enough routed
    tokens, or whose Cholesky factorisation fails, is rounded to nearest and says why."""
    mats = {e: dict(zip(PARTS, (layer.gate_proj[e], layer.up_proj[e], layer.down_proj[e]))) for e in widths}
    how = {e: "rtn" for e in widths}
    out: dict[int, QuantizedExpert] = {}
    if quantizer == "gptq":
        for e, width in widths.items():
            n = int(traffic.count[e]) if traffic is not None else 0
            if width == "fp8":
                continue  # FP8 needs no calibration: round to nearest
            if traffic is None or e not in traffic.h_in:
                how[e] = "rtn (fallback: no calibration tokens)"
            elif not traffic.all_experts and n < min_tokens:
                how[e] = f"rtn (fallback: {n} tokens < {min_tokens})"
            else:
                how[e] = "gptq"
        for width in sorted({w for e, w in widths.items() if how[e] == "gptq"}, key=str):
            members = [e for e, w in widths.items() if w == width and how[e] == "gptq"]
            args = weight_args(width, group_size, symmetric)
            res = {e: ({}, {}) for e in members}
            failed: set[int] = set()
            for part in PARTS:
                cols = mats[members[0]][part].shape[1]
                step = max(1, _HESSIAN_BYTES // (16 * cols * cols))
                for i in range(0, len(members), step):
                    chunk = members[i:i + step]
                    hs = torch.stack([(traffic.h_down if part == "down" else traffic.h_in)[e] for e in chunk])
                    ws = torch.stack([mats[e][part] for e in chunk])
                    deq, qps, ok = gptq_batch(ws, hs.to(ws.device), args, store_dtype, damp=damp)
                    for j, e in enumerate(chunk):
                        res[e][0][part], res[e][1][part] = deq[j], qps[j]
                        if not ok[j]:
                            failed.add(e)
            for e in members:
                if e in failed:
                    how[e] = "rtn (fallback: Cholesky failed)"
                else:
                    out[e] = QuantizedExpert(res[e][0], res[e][1], "gptq")
    for e, width in widths.items():
        if e in out:
            continue
        args = weight_args(width, group_size, symmetric)
        deq, qps = {}, {}
        for part, w in mats[e].items():
            deq[part], qps[part] = rtn(w, args, store_dtype)
        out[e] = QuantizedExpert(deq, qps, how[e])
    return dict(sorted(out.items()))


@contextlib.contextmanager
def expert_weights(layer: MoELayer, e: int, weights: dict[str, torch.Tensor]):
    """Expert ``e`` temporarily holds ``weights`` (canonical parts)."""
    old = [layer.gate_proj[e].clone(), layer.up_proj[e].clone(), layer.down_proj[e].clone()]
    dt = old[0].dtype
    layer.set_expert(e, *(weights[p].to(dt) for p in PARTS))
    try:
        yield
    finally:
        layer.set_expert(e, *old)


@torch.no_grad()
def output_loss(layer: MoELayer, e: int, traffic: ExpertTraffic, quantized: dict[str, torch.Tensor]) -> float:
    """MC-MoE's eps: ||Z - Z^||_F of the layer output on the sampled tokens when only expert ``e``
    holds ``quantized`` weights: its routed contributions change, nothing else does."""
    dev = layer.gate_proj.device
    total = 0.0
    for x, idx, w in traffic.sample:
        tok, pos = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe, a = x[tok].to(dev), w[tok, pos].to(dev)
        ref = layer.weighted_expert_output(e, xe, a).float()
        with expert_weights(layer, e, quantized):
            new = layer.weighted_expert_output(e, xe, a).float()
        total += float((ref - new).double().square().sum())
    return total ** 0.5

