"""Score-based expert selection: rank experts per layer by one routing statistic.

The statistics themselves (and their definitions, with the papers' equations) live in
:mod:`moecompress.stats.observer`; here a method is "keep the ``keep`` experts with the
highest score, the protected ones first". Ties go to the lower expert index, so that the
choice is deterministic.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import MoECompressError
from .selection import Plan, Selection


def select_top(scores: torch.Tensor, keep: int, protected: set[int] = frozenset(), groups: int = 1) -> list[int]:
    """The ``keep`` experts with the highest ``scores`` (protected ones always), ascending;
    with ``groups`` > 1, the best keep / groups of every contiguous group of experts.

    NaN scores rank last; equal scores rank by expert index.
    """
    s = torch.nan_to_num(scores.double(), nan=float("-inf")).tolist()
    size, quota = len(s) // groups, keep // groups
    kept = []
    for g in range(groups):
        order = sorted(range(g * size, (g + 1) * size), key=lambda e: (e not in protected, -s[e], e))
        kept += order[:quota]
    return sorted(kept)


def stat_selector(stat: str) -> Callable[[Selection], Plan]:
    """A method that keeps the experts with the highest ``stat`` (a [E] statistic)."""

    def select(sel: Selection) -> Plan:
        if sel.stats is None:
            raise MoECompressError("this method ranks experts by routing statistics; pass --calib FILE or --stats FILE")
        kept, scores = {}, {}
        for layer in sel.view:
            try:
                s = sel.stats.get(layer.layer_idx, stat).double().cpu()
            except KeyError:
                raise MoECompressError(f"the statistics file has no '{stat}' for layer {layer.layer_idx}; "
                                       "recompute it with `moecompress stats`") from None
            scores[layer.layer_idx] = s
            kept[layer.layer_idx] = select_top(s, sel.keep, sel.protected.get(layer.layer_idx, set()), sel.groups)
        return Plan(kept=kept, scores=scores)

    select.__doc__ = f"Keep the experts with the highest '{stat}' statistic (see moecompress.stats)."
    return select


def random_select(sel: Selection) -> Plan:
    """Seeded baseline: every layer keeps a uniformly random set of experts (protected ones
    first). One generator seeded with ``seed`` draws the layers in order."""
    g = torch.Generator().manual_seed(sel.seed)
    kept, scores = {}, {}
    for layer in sel.view:
        s = torch.rand(layer.num_experts, generator=g, dtype=torch.float64)
        scores[layer.layer_idx] = s
        kept[layer.layer_idx] = select_top(s, sel.keep, sel.protected.get(layer.layer_idx, set()), sel.groups)
    return Plan(kept=kept, scores=scores)
