"""Library entry points of expert merging.

* :func:`plan_merge` — calibration pass 1 and the clusters of every MoE layer (edits nothing).
* :func:`merge_experts` — plan, merge each cluster into one expert, keep one router row per
  merged expert, optionally re-fit the merged experts (pass 2), in place on a loaded model.
* :func:`moecompress.merge.checkpoint.merge_checkpoint` — load, merge, write a standard HF
  checkpoint (fewer experts, config updated) with a ``moecompress.json`` record of the clusters.
* :mod:`.blocks` builds the merged blocks.

Router rule (documented choice, measured on the testbed, docs/benchmarks.md): a merged expert
keeps the router row — and per-expert router tensors (bias, ``e_score_correction_bias``) — of
its most frequently routed member (``router="dominant"``, default), or their weighted average
with the expert-merge weights (``router="weighted"``). The papers keep the full router and let
all members share the merged weights; a stock checkpoint needs one row per expert, so top-k
runs over the merged rows and selects a merged expert at most once per token. The model's own
router then renormalises the top-k weights as before (``norm_topk_prob``...), and the re-fit
(:mod:`moecompress.refit`) absorbs what changed for tokens that had chosen other members.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from ..arch import MoEModel, moe_view
from ..capture import run_calibration
from ..errors import MoECompressError
from ..onload import is_streamed
from ..refit import refit_to_original
from ..repair import DEFAULT_TARGET
from .blocks import defer_blocks, merged_expert, replace_blocks  # noqa: F401 (merged_expert: part of this module's API)
from .cluster import check_clustering, dominant_groups, dominant_member, hierarchical_clusters, logit_cosine
from .observe import MergeObserver


@dataclass(frozen=True)
class Method:
    name: str
    clustering: str  # "outputs" (HC-SMoE) or "dominant" (M-SMoE)
    weights: str  # "frequency" or "uniform"
    align: bool  # permutation-align members to the dominant expert before averaging
    summary: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("m-smoe", "dominant", "frequency", True,
           "M-SMoE: dominant experts by frequency, others grouped by router-logit similarity, "
           "neurons permutation-aligned, frequency-weighted merge (Li et al., ICLR 2024)"),
    Method("hc-smoe", "outputs", "frequency", False,
           "HC-SMoE: hierarchical clustering of average expert outputs, frequency-weighted merge "
           "(Chen et al., ICML 2025)"),
    Method("average", "outputs", "uniform", False,
           "HC-SMoE clusters merged by plain uniform averaging (baseline)"),
)}
DEFAULT_METHOD = "m-smoe"
ROUTER_RULES = ("dominant", "weighted")
DEFAULT_RIDGE = 1e-2


@dataclass
class MergeResult:
    method: str
    num_experts: int  # per MoE layer, before
    keep: int  # per MoE layer, after
    clusters: dict[int, list[list[int]]]  # merged expert j of layer li = clusters[li][j] (original indices)
    dominant: dict[int, list[int]]  # member whose router row merged expert j keeps
    merge_error: dict[int, float | None] = field(default_factory=dict)  # before the re-fit
    options: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self, *, with_time: bool = True) -> dict:
        d = {"method": self.method, "num_experts": self.num_experts, "keep": self.keep,
             "clusters": {str(k): v for k, v in self.clusters.items()},
             "dominant_experts": {str(k): v for k, v in self.dominant.items()},
             "merge_error": {str(k): (None if v is None else float(f"{v:.6g}")) for k, v in self.merge_error.items()},
             "options": self.options}
        if with_time:
            d["seconds"] = round(self.seconds, 3)
        return d


# ----- checks --------------------------------------------------------------------------------
def check_options(*, method: str, num_experts: int, keep: int, linkage: str = "average", metric: str = "euclidean",
                  router: str = "dominant", ridge: float = DEFAULT_RIDGE, batch_size: int = 8) -> None:
    if method not in METHODS:
        raise MoECompressError(f"unknown merge method '{method}'; use one of: {', '.join(METHODS)}")
    if not 1 <= keep < num_experts:
        raise MoECompressError(f"--keep must be between 1 and {num_experts - 1} (the model has {num_experts} "
                               f"experts per MoE layer), got {keep}")
    check_clustering(linkage, metric)
    if router not in ROUTER_RULES:
        raise MoECompressError(f"unknown --router '{router}'; use one of: {', '.join(ROUTER_RULES)}")
    if not ridge >= 0:
        raise MoECompressError(f"--ridge must be >= 0, got {ridge}")
    if batch_size < 1:
        raise MoECompressError("--batch-size must be at least 1")


def _frequencies_from_stats(stats, view: MoEModel) -> dict[int, torch.Tensor]:
    out = {}
    for layer in view:
        try:
            count = stats.get(layer.layer_idx, "count")
        except KeyError:
            raise MoECompressError(f"the statistics have no count for MoE layer {layer.layer_idx}; they were computed "
                                   "for another model — recompute them with `moecompress stats`") from None
        if count.numel() != layer.num_experts:
            raise MoECompressError(f"the statistics describe {count.numel()} experts in layer {layer.layer_idx}, the "
                                   f"model has {layer.num_experts}; recompute them with `moecompress stats` on this model")
        out[layer.layer_idx] = count.double().cpu()
    return out


# ----- library API -----------------------------------------------------------------------------
@dataclass
class MergePlan:
    clusters: dict[int, list[list[int]]]  # ordered by dominant member
    dominant: dict[int, list[int]]
    frequency: dict[int, torch.Tensor]


def plan_merge(model, tokens: torch.Tensor, *, keep: int, method: str = DEFAULT_METHOD, stats=None,
               linkage: str = "average", metric: str = "euclidean", batch_size: int = 8,
               progress: bool = True) -> MergePlan:
    """Calibrate (pass 1) and cluster every MoE layer's experts into ``keep`` clusters."""
    view = moe_view(model)
    check_options(method=method, num_experts=view.num_experts, keep=keep, linkage=linkage, metric=metric,
                  batch_size=batch_size)
    spec = METHODS[method]
    obs = MergeObserver(outputs=spec.clustering == "outputs", logits=spec.clustering == "dominant")
    run_calibration(model, tokens, [obs], batch_size=batch_size, view=view, progress=progress,
                    description="merge: expert outputs and routing")
    freq = _frequencies_from_stats(stats, view) if stats is not None else dict(obs.count)
    clusters = {}
    # Grouped routing (n_group): each routing group is clustered on its own into keep / n_group
    # clusters, so every merged expert stays in its members' group and n_group stays valid.
    n_group = view.balanced_groups(keep)
    size = view.num_experts // n_group
    for layer in view:
        li = layer.layer_idx
        clusters[li] = []
        for g in range(n_group):
            idx = list(range(g * size, (g + 1) * size))
            if spec.clustering == "outputs":
                local = hierarchical_clusters(obs.mean_outputs(li)[idx], keep // n_group, linkage, metric)
            else:
                sim = logit_cosine(obs.logit_gram[li])[idx][:, idx]
                local = dominant_groups(freq[li][idx], sim, keep // n_group)
            clusters[li] += [[idx[i] for i in c] for c in local]
    return order_by_dominant(clusters, freq)


def order_by_dominant(clusters: dict[int, list[list[int]]], freq: dict[int, torch.Tensor]) -> MergePlan:
    """Attach each cluster's dominant member and order the clusters by it (the kept order)."""
    out_c, out_d = {}, {}
    for li, groups in clusters.items():
        doms = [dominant_member(sorted(g), freq[li]) for g in groups]
        order = sorted(range(len(groups)), key=lambda j: doms[j])
        out_c[li] = [sorted(groups[j]) for j in order]
        out_d[li] = [doms[j] for j in order]
    return MergePlan(out_c, out_d, freq)


def _check_clusters(clusters: dict[int, list[list[int]]], view: MoEModel) -> None:
    sizes = set()
    for layer in view:
        groups = clusters.get(layer.layer_idx)
        if groups is None:
            raise MoECompressError(f"no clusters given for MoE layer {layer.layer_idx}")
        flat = sorted(e for g in groups for e in g)
        if flat != list(range(layer.num_experts)) or any(not g for g in groups):
            raise MoECompressError(f"the clusters of layer {layer.layer_idx} must partition experts "
                                   f"0..{layer.num_experts - 1}, each expert exactly once")
        sizes.add(len(groups))
    if len(sizes) != 1:
        raise MoECompressError("every MoE layer needs the same number of clusters (one config field describes the model)")


@torch.no_grad()
def merge_experts(model, *, keep: int, method: str = DEFAULT_METHOD, tokens: torch.Tensor | None = None,
                  stats=None, clusters: dict[int, list[list[int]]] | None = None, linkage: str = "average",
                  metric: str = "euclidean", router: str = "dominant", refit: bool = True,
                  ridge: float = DEFAULT_RIDGE, batch_size: int = 8, progress: bool = True,
                  offload_folder: str | os.PathLike | None = None, repair: str | None = None,
                  repair_target: str = DEFAULT_TARGET, tune_epochs: int | None = None, tune_lr: float | None = None,
                  seed: int = 0) -> MergeResult:
    """Merge every MoE layer's experts into ``keep`` experts, in place.

    ``tokens`` [n, seq_len] are the calibration tokens (needed to cluster, to count
    frequencies unless ``stats`` gives them, and for the re-fit). ``clusters`` overrides the
    method's clustering (``{layer_idx: [[experts], ...]}``); the method still decides how a
    cluster is merged. ``repair`` (instead of ``refit``) runs ``repair.repair`` on the merged
    layers, with ``repair_target``, and for ``refit+tune`` ``tune_epochs``, ``tune_lr`` and
    ``seed``.

    The model may be streamed (``load_model(max_gpu_memory=...)``): layers are merged one at
    a time from onloaded weights and the merged blocks are offloaded to ``offload_folder``
    (a temporary folder if not given; given, it is used even for a model in memory, so that
    the merged copies never add to its memory). Results equal the in-memory run's.
    """
    start = time.perf_counter()
    view = moe_view(model)
    num_experts = view.num_experts
    check_options(method=method, num_experts=num_experts, keep=keep, linkage=linkage, metric=metric, router=router,
                  ridge=ridge, batch_size=batch_size)
    spec = METHODS[method]
    if repair is not None:
        from ..repair import check_mode

        check_mode(repair)
        refit = repair != "none"
    if tokens is None and (clusters is None or stats is None or refit):
        raise MoECompressError("merging needs calibration text; pass --calib FILE")
    if clusters is not None:
        _check_clusters(clusters, view)
        if len(next(iter(clusters.values()))) != keep:
            raise MoECompressError(f"the given clusters make {len(next(iter(clusters.values())))} experts, not --keep {keep}")
        if stats is not None:
            freq = _frequencies_from_stats(stats, view)
        else:
            obs = MergeObserver(outputs=False, logits=False)
            run_calibration(model, tokens, [obs], batch_size=batch_size, view=view, progress=progress,
                            description="merge: routing frequencies")
            freq = dict(obs.count)
        plan = order_by_dominant(clusters, freq)
    else:
        plan = plan_merge(model, tokens, keep=keep, method=method, stats=stats, linkage=linkage, metric=metric,
                          batch_size=batch_size, progress=progress)

    blocks = None
    if refit and repair is not None and is_streamed(model):  # built as the repair reaches each layer (as prune does)
        originals, blocks = defer_blocks(model, plan, spec, router, offload_folder)
    else:
        originals = replace_blocks(model, plan, spec, router, offload_folder, keep_originals=refit)

    errors: dict[int, float | None] = {}
    if refit and repair is not None:
        from ..repair import repair as run_repair

        record = run_repair(model, originals, tokens, mode=repair, batch_size=batch_size, progress=progress,
                            target=repair_target, tune_epochs=tune_epochs, tune_lr=tune_lr, seed=seed, blocks=blocks)
        if blocks is not None:
            blocks.finish()
        errors = {li: v.get("relative_error") for li, v in record["layers"].items()}
        del originals
    elif refit:
        errors = refit_to_original(model, originals, tokens, ridge=ridge, batch_size=batch_size, progress=progress)
        del originals
    options = {"linkage": linkage if spec.clustering == "outputs" and clusters is None else None,
               "distance": metric if spec.clustering == "outputs" and clusters is None else None,
               "router": router, "refit": refit, "ridge": ridge if refit and repair is None else None,
               "repair": repair,
               "frequencies": "stats" if stats is not None else "calibration",
               "clusters_given": clusters is not None}
    return MergeResult(method=method, num_experts=num_experts, keep=keep, clusters=plan.clusters,
                       dominant=plan.dominant, merge_error=errors, options=options,
                       seconds=time.perf_counter() - start)
