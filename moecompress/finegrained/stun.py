"""STUN: structured (whole experts) then unstructured pruning.

Lee et al., "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning" (2024,
arXiv:2409.06211). Stage 1 removes whole experts (the paper's behaviour-similarity clustering
with greedy decisions: the ``stun`` method of ``moecompress.prune``, any other registered
expert-pruning method can stand in); stage 2 prunes the remaining experts' weights with an
unstructured method (the paper uses Wanda; ``moe-pruner`` and ``magnitude`` are offered too).

The split of the budget is the parameter ``expert_ratio`` (fraction of experts removed in
stage 1). Sparsity is counted over the routed experts' gate/up/down weights: to reach a total
``sparsity`` S after removing the fraction r of experts, stage 2 prunes
``s = 1 - (1 - S) / (1 - r)`` of every remaining matrix, so that ``(1 - r)(1 - s) = 1 - S``.
Stage 2's calibration statistics are gathered on the model after stage 1.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..arch import moe_view
from ..errors import MoECompressError
from ..merge.offload import layer_editor
from .unstructured import METHODS as UNSTRUCTURED_METHODS
from .unstructured import parse_nm, unstructured_prune

# (model, tokens, keep_per_layer) -> {layer_idx: kept expert indices}; edits nothing.
ExpertSelector = Callable[[object, torch.Tensor, int], dict[int, list[int]]]


def kept_count(num_experts: int, expert_ratio: float) -> int:
    """Experts STUN's first stage keeps of ``num_experts`` when it removes ``expert_ratio``."""
    return max(1, int(round(num_experts * (1 - expert_ratio))))


def stun_prune(model, tokens: torch.Tensor, sparsity: float | None, expert_ratio: float, *,
               expert_method: str = "stun", unstructured: str = "wanda", nm: tuple[int, int] | str | None = None,
               expert_selector: ExpertSelector | None = None, batch_size: int = 8, progress: bool = True,
               offload_folder=None) -> dict:
    """Run both STUN stages on ``model`` in place; returns a report.

    ``expert_selector`` overrides the registry lookup of ``expert_method`` (tests use it). A
    streamed model is edited one layer at a time, the edits kept in ``offload_folder`` (see
    ``unstructured_prune``).
    """
    nm = parse_nm(nm) if isinstance(nm, str) else nm
    if unstructured not in UNSTRUCTURED_METHODS:
        raise MoECompressError(f"unknown STUN second stage '{unstructured}'; use one of: {', '.join(UNSTRUCTURED_METHODS)}")
    if not 0.0 <= expert_ratio < 1.0:
        raise MoECompressError(f"--stun-expert-ratio must be in [0, 1), got {expert_ratio}")
    view = moe_view(model)
    n_experts = view.num_experts
    keep = kept_count(n_experts, expert_ratio)
    removed_fraction = 1 - keep / n_experts
    if nm is None:
        if sparsity is None or not 0.0 <= sparsity < 1.0:
            raise MoECompressError("stun needs --sparsity S in [0, 1) (total over expert weights) or --nm N:M")
        if removed_fraction > sparsity + 1e-9:
            raise MoECompressError(
                f"--stun-expert-ratio {expert_ratio} removes {removed_fraction:.3f} of the experts, more than the total "
                f"--sparsity {sparsity}; lower the expert ratio or raise the sparsity")
        stage2 = 1 - (1 - sparsity) / (1 - removed_fraction)
    elif sparsity is not None:
        raise MoECompressError("give --sparsity or --nm for stun, not both")
    else:
        stage2 = None
    report = {"method": "stun", "paper": "STUN (Lee et al. 2024, arXiv:2409.06211)", "expert_method": expert_method,
              "expert_ratio": expert_ratio, "experts_before": n_experts, "experts_after": keep,
              "unstructured_method": unstructured, "unstructured_sparsity": stage2}
    if keep < n_experts:
        selector = expert_selector or registry_selector(expert_method)
        kept = selector(model, tokens, keep)
        view.keep_experts({i: sorted(int(e) for e in kept[i]) for i in view.moe_layer_indices},
                          edit=layer_editor(model, offload_folder))
        report["kept_experts"] = {int(i): sorted(int(e) for e in v) for i, v in kept.items()}
    stage = unstructured_prune(model, tokens, stage2, unstructured, nm, batch_size=batch_size, progress=progress,
                               offload_folder=offload_folder)
    report["unstructured"] = stage
    report["expert_weight_sparsity"] = 1 - (keep / n_experts) * (1 - stage["expert_weight_sparsity"])
    return report


def registry_selector(name: str) -> ExpertSelector:
    """The expert-pruning method ``name`` of ``moecompress.prune`` as an :data:`ExpertSelector`."""
    try:
        from ..prune import select_experts  # issue-4 expert pruning
    except ImportError:
        raise MoECompressError(
            f"STUN's first stage needs the expert-pruning method '{name}' from moecompress.prune, "
            "which this installation lacks") from None

    def select(model, tokens, keep):
        return select_experts(model, tokens, keep=keep, method=name)

    return select
