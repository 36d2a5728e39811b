"""One expert's weights in the canonical layout, and their weighted average (the merge step).

Frequency-weighted merging (M-SMoE Eq. 3; HC-SMoE Sec. 3.3): the merged expert of a cluster
``C`` is ``W = sum_{i in C} f_i W_i / sum_{i in C} f_i`` for every weight tensor ``W`` (gate,
up, down and biases), ``f_i`` the routing frequency of expert ``i`` on the calibration tokens.
Uniform averaging is the same with all ``f_i`` equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import MoELayer


@dataclass
class ExpertWeights:
    gate: torch.Tensor  # [I, H]
    up: torch.Tensor  # [I, H]
    down: torch.Tensor  # [H, I]
    gate_bias: torch.Tensor | None = None  # [I]
    up_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [H]

    @classmethod
    def read(cls, layer: MoELayer, e: int) -> "ExpertWeights":
        """A float32 copy of expert ``e`` of ``layer``."""
        gb, ub, db = layer.expert_biases
        f = lambda t: None if t is None else t[e].detach().float().clone()  # noqa: E731
        return cls(f(layer.gate_proj), f(layer.up_proj), f(layer.down_proj), f(gb), f(ub), f(db))

    @torch.no_grad()
    def write(self, layer: MoELayer, e: int) -> None:
        """Store these weights as expert ``e`` of ``layer`` (in the layer's dtype)."""
        layer.set_expert(e, self.gate, self.up, self.down)
        for view, value in zip(layer.expert_biases, (self.gate_bias, self.up_bias, self.down_bias)):
            if view is not None and value is not None:
                view[e].copy_(value)

    def permuted(self, perm: torch.Tensor) -> "ExpertWeights":
        """The same function with its intermediate neurons reordered: neuron ``a`` <- ``perm[a]``."""
        p = perm.to(self.gate.device)
        pick = lambda b: None if b is None else b[p]  # noqa: E731
        return ExpertWeights(self.gate[p], self.up[p], self.down[:, p], pick(self.gate_bias), pick(self.up_bias),
                             self.down_bias)

    def tensors(self) -> tuple:
        return (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)


def merge_weights(experts: list[ExpertWeights], weights: torch.Tensor) -> ExpertWeights:
    """``sum_i weights_i * experts_i`` for every tensor (weights must sum to 1)."""
    w = weights.double()
    out = []
    for parts in zip(*(x.tensors() for x in experts)):
        if parts[0] is None:
            out.append(None)
            continue
        acc = sum(float(wi) * p.double() for wi, p in zip(w, parts))
        out.append(acc.float())
    return ExpertWeights(*out)


def member_weights(freq: torch.Tensor, members: list[int], rule: str) -> torch.Tensor:
    """Merge weights of ``members``: their routing frequencies normalised to sum 1
    (``rule="frequency"``; uniform when no member was ever routed) or uniform (``"uniform"``)."""
    f = freq[members].double().clamp_min(0)
    if rule == "uniform" or float(f.sum()) == 0.0:
        return torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
    return f / f.sum()
