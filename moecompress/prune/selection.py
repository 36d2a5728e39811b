"""What a pruning method reads (:class:`Selection`) and returns (:class:`Plan`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..arch import MoEModel


@dataclass
class Selection:
    """Everything a method may read. ``protected[layer_idx]`` experts must be kept."""

    model: object
    view: MoEModel
    keep: int
    tokens: torch.Tensor | None = None
    stats: object | None = None  # moecompress.stats.Stats
    seed: int = 0
    protected: dict[int, set[int]] = field(default_factory=dict)
    batch_size: int = 8
    progress: bool = False
    options: dict = field(default_factory=dict)
    # Grouped routing (DeepSeek-V3, GLM-4.5, DeepSeek-V2): the E experts form ``groups``
    # contiguous groups and every group keeps keep / groups of them (as llm-compressor's REAP
    # does), so n_group stays valid; 1 = no constraint (MoEModel.balanced_groups decides).
    groups: int = 1
    # Called as on_layer(layer_idx, kept) by a method that chooses a layer at a time, as soon as
    # that layer's set is final and the method will not run the layer again (NAEE): the caller
    # may then edit the layer (the prune's re-fit, beside the selection of the next layers).
    # Methods that choose every layer at once do not call it.
    on_layer: Callable[[int, list[int]], None] | None = None

    def group_of(self, num_experts: int) -> list[range]:
        size = num_experts // self.groups
        return [range(g * size, (g + 1) * size) for g in range(self.groups)]


@dataclass
class Plan:
    kept: dict[int, list[int]]  # layer_idx -> kept experts, ascending
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer_idx -> [E], higher = kept first
    info: dict = field(default_factory=dict)  # method-specific report (errors, clusters, ...)
