"""One entry point for the fine-grained methods on a loaded model (``finegrained_prune``);
checkpoints go through ``moecompress.prune.prune_checkpoint`` like every pruning method."""

from __future__ import annotations

import torch

from ..errors import MoECompressError
from .heapr import heapr_prune
from .stun import stun_prune
from .unstructured import METHODS as UNSTRUCTURED_METHODS
from .unstructured import parse_nm, unstructured_prune

METHODS = ("heapr", *UNSTRUCTURED_METHODS, "stun-unstructured")


def finegrained_prune(model, tokens: torch.Tensor | None, method: str, *, ratio: float | None = None,
                      sparsity: float | None = None, nm: str | tuple[int, int] | None = None,
                      heapr_global: bool = False, stun_expert_ratio: float | None = None,
                      stun_expert_method: str = "stun", stun_unstructured: str = "wanda",
                      batch_size: int = 8, progress: bool = True, offload_folder=None) -> dict:
    """Prune ``model`` in place with one of :data:`METHODS`; returns the JSON-able report.

    A streamed model (``load_model(max_gpu_memory=...)``) is pruned one layer at a time, its
    edited layers kept on disk in ``offload_folder`` (a temporary folder if not given); the
    result equals the in-memory run's."""
    nm = parse_nm(nm) if isinstance(nm, str) else nm
    if method == "heapr":
        if ratio is None:
            raise MoECompressError("heapr needs --ratio R (the fraction of each expert's neurons to remove)")
        if sparsity is not None or nm is not None:
            raise MoECompressError("heapr removes whole neurons: use --ratio, not --sparsity/--nm")
        return heapr_prune(model, tokens, ratio, global_ranking=heapr_global, batch_size=batch_size, progress=progress,
                           offload_folder=offload_folder)
    if method in UNSTRUCTURED_METHODS:
        return unstructured_prune(model, tokens, sparsity, method, nm, batch_size=batch_size, progress=progress,
                                  offload_folder=offload_folder)
    if method == "stun-unstructured":
        if stun_expert_ratio is None:
            raise MoECompressError("stun-unstructured needs --stun-expert-ratio R (fraction of experts removed first)")
        return stun_prune(model, tokens, sparsity, stun_expert_ratio, expert_method=stun_expert_method,
                          unstructured=stun_unstructured, nm=nm, batch_size=batch_size, progress=progress,
                          offload_folder=offload_folder)
    raise MoECompressError(f"unknown fine-grained method '{method}'; use one of: {', '.join(METHODS)}")
