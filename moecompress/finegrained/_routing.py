"""Per-expert slices of one MoE layer's calibration traffic (batched: one slice per expert)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..arch import MoELayer, Routing


@dataclass
class ExpertTokens:
    """The tokens routed to expert ``e`` in one batch.

    ``x_in`` is what the expert actually reads ([n, H]) and ``out_scale`` ([n]) what its output
    is multiplied by in the layer output: (x, routing weight) for most families, (x * weight, 1)
    for Llama-4, whose router scales the expert input instead of its output.
    """

    e: int
    tok: torch.Tensor  # [n] token positions in the batch
    weight: torch.Tensor  # [n] routing weight (float32)
    x_in: torch.Tensor  # [n, H]
    out_scale: torch.Tensor  # [n] (float32)


def routed_tokens(layer: MoELayer, x: torch.Tensor, routing: Routing) -> Iterator[ExpertTokens]:
    """Group a batch's tokens by routed expert (one sort, no Python loop per token)."""
    idx = routing.topk_idx.reshape(-1)
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx, minlength=layer.num_experts).tolist()
    k = routing.topk_idx.shape[1]
    tok_all = torch.div(order, k, rounding_mode="floor")
    w_all = routing.topk_weight.reshape(-1)[order].float()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok, w = tok_all[start:start + n], w_all[start:start + n]
        start += n
        xe = x[tok]
        if layer.spec.weight_on_input:
            yield ExpertTokens(e, tok, w, xe * w[:, None].to(xe.dtype), torch.ones_like(w))
        else:
            yield ExpertTokens(e, tok, w, xe, w)
