"""Library entry points of expert merging.

* :func:`plan_merge` — calibration pass 1 and the clusters of every MoE layer (edits nothing).
* :func:`merge_experts` — plan, merge each cluster into one expert, keep one router row per
  merged expert, optionally re-fit the merged experts (pass 2), in place on a loaded model.
* :func:`merge_checkpoint` — load, merge, write a standard HF checkpoint (fewer experts, config
  updated) with a ``moecompress.json`` record of the clusters. Input checks run first.

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

import operator
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device

from ..arch import MoELayer, MoEModel, moe_view
from ..capture import run_calibration
from ..errors import MoECompressError
from ..options import MergeOptions, library_function
from ..onload import detached_copy, module_execution_device, onloaded
from ..surgery import ModelReplacements
from .align import match_neurons, member_permutations
from .cluster import check_clustering, dominant_groups, dominant_member, hierarchical_clusters, logit_cosine
from .combine import ExpertWeights, member_weights, merge_weights
from .observe import MergeObserver
from .offload import offload_block, offload_folder_for
from ..refit import refit_to_original


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
def merged_expert(layer, members: list[int], dominant: int, freq: torch.Tensor, method: Method,
                  perms: dict[int, torch.Tensor] | None = None) -> tuple[ExpertWeights, torch.Tensor]:
    """The merged weights of one cluster and the per-member merge weights; ``perms`` are the
    members' neuron alignments if already solved (:func:`.align.member_permutations`)."""
    w = member_weights(freq, members, method.weights)
    ref = ExpertWeights.read(layer, dominant)
    experts = []
    for e in members:
        x = ExpertWeights.read(layer, e)
        if method.align and e != dominant:
            x = x.permuted(perms[e] if perms is not None else match_neurons(ref, x))
        experts.append(x)
    return merge_weights(experts, w), w


@torch.no_grad()
def merge_experts(model, *, keep: int, method: str = DEFAULT_METHOD, tokens: torch.Tensor | None = None,
                  stats=None, clusters: dict[int, list[list[int]]] | None = None, linkage: str = "average",
                  metric: str = "euclidean", router: str = "dominant", refit: bool = True,
                  ridge: float = DEFAULT_RIDGE, batch_size: int = 8, progress: bool = True,
                  offload_folder: str | os.PathLike | None = None, repair: str | None = None) -> MergeResult:
    """Merge every MoE layer's experts into ``keep`` experts, in place.

    ``tokens`` [n, seq_len] are the calibration tokens (needed to cluster, to count
    frequencies unless ``stats`` gives them, and for the re-fit). ``clusters`` overrides the
    method's clustering (``{layer_idx: [[experts], ...]}``); the method still decides how a
    cluster is merged.

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

    originals = replace_blocks(model, plan, spec, router, offload_folder, keep_originals=refit)

    errors: dict[int, float | None] = {}
    if refit and repair is not None:
        from ..repair import repair as run_repair

        record = run_repair(model, originals, tokens, mode=repair, batch_size=batch_size, progress=progress)
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


def replace_blocks(model, plan: MergePlan, method: Method, router: str = "dominant",
                   offload_folder: str | os.PathLike | None = None, *,
                   keep_originals: bool = True) -> dict[int, torch.nn.Module]:
    """Replace every MoE block of ``model`` by a new block whose expert ``j`` merges
    ``plan.clusters[li][j]`` (a cluster of one expert is that expert: pruning), and return the
    original blocks (if ``keep_originals``), the re-fit's reference. Blocks are built one layer at a time from the
    (onloaded) original; a streamed model keeps the new blocks on disk (``offload_folder``, a
    temporary folder if not given), like its own layers. The config follows the new count."""
    view = moe_view(model)
    folder = offload_folder_for(model, offload_folder)
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    originals = {}
    for source in view:
        li = source.layer_idx
        block = _merged_block(source, plan.clusters[li], plan.dominant[li], plan.frequency[li], method, router)
        if folder is not None:
            offload_block(block, folder / f"merged-layer-{li}.safetensors", module_execution_device(source.block))
        if keep_originals:
            originals[li] = source.block
        setattr(decoder_layers[li], view.spec.moe_block, block)
    grouped = view.stays_grouped(plan.dominant)  # read before the view sees the merged blocks
    keep = len(next(iter(plan.dominant.values())))
    moe_view(model)._set_config_num_experts(keep, grouped=grouped)  # config (and grouped-routing fields)
    return originals


@torch.no_grad()
def _merged_block(source, clusters: list[list[int]], dominant: list[int], freq: torch.Tensor, method: Method,
                  router: str) -> torch.nn.Module:
    """A new MoE block for ``source``'s layer whose expert ``j`` is the merge of ``clusters[j]``.

    Everything but the experts and the router's per-expert tensors is copied from the
    onloaded original; those are built at the merged size directly (never a full-size copy).
    Router rule "dominant": expert ``j`` keeps the row (and per-expert router tensors) of
    ``dominant[j]``; "weighted": their average with the expert-merge weights.
    """
    with onloaded(source.block):
        per_expert = [*source.expert_parameters().values(), source.router_weight, *source.router_expert_tensors.values()]
        block = detached_copy(source.block, skip=per_expert, share=[source.model.config])
        target = MoELayer(source.model, source.spec, source.layer_idx, block)
        target.keep_experts(dominant)  # shapes and module counters (the tensors are still meta)
        device = source.router_weight.device
        for module, path in [(target.experts, n) for n in target.expert_parameters()] + \
                [(target.router, "weight")] + [(target.router, p) for p in target.router_expert_tensors]:
            t = operator.attrgetter(path)(module)
            set_module_tensor_to_device(module, path, device, value=torch.empty(t.shape, dtype=t.dtype, device=device))
        rows, row_tensors = source.router_weight.data, source.router_expert_tensors
        perms = member_permutations(source, clusters, dominant) if method.align else None
        for j, (members, dom) in enumerate(zip(clusters, dominant)):
            weights, w = merged_expert(source, members, dom, freq, method, perms)
            weights.write(target, j)
            if router == "weighted":
                target.router_weight.data[j] = (w.to(rows.device)[:, None] * rows[members].double()).sum(0).to(rows.dtype)
                for path, t in row_tensors.items():
                    target.router_expert_tensors[path].data[..., j] = \
                        (w.to(t.device) * t.data[..., members].double()).sum(-1).to(t.dtype)
            else:
                target.router_weight.data[j] = rows[dom]
                for path, t in row_tensors.items():
                    target.router_expert_tensors[path].data[..., j] = t.data[..., dom]
    return block


def streamed_working_bytes(config, keep: int, refit: bool, dtype: str = "auto") -> int:
    """GPU bytes a streamed merge holds besides what ``load_model`` already budgets (resident
    weights and room for one onloaded decoder layer): the merged block, built while the
    original is onloaded and, in the re-fit, onloaded with the original block that serves as
    its reference, and the re-fit's accumulators of a layer group.

    Measured on an H100 (OLMoE-1B-7B shape, 4 GiB cap): with none of this reserved the peak
    was 9.49 GiB; reserving a whole original block besides (double counting accelerate's
    room for a layer) left less weights budget than one layer, and accelerate then silently
    placed every weight on the CPU (peak 0.19 GiB, the merge computed on the CPU), which
    ``load_model`` now refuses."""
    from ..checkpoint import parse_dtype, stored_dtype
    from ..surgery import meta_view
    from ..refit import peak_accumulator_bytes

    view = meta_view(config)
    dt = parse_dtype(dtype) if dtype != "auto" else None
    size = (dt or stored_dtype(config) or torch.float32).itemsize
    block = max(sum(p.numel() for p in layer.block.parameters()) for layer in view) * size
    merged = block * keep // max(view.layers[0].num_experts, 1)
    return merged + (peak_accumulator_bytes(view, keep) if refit else 0)


def merged_replacements(model, result: MergeResult) -> ModelReplacements:
    """What shard surgery must write besides the input's tensors, read from the ``model`` that
    :func:`merge_experts` merged into ``result``, one layer at a time: the expert weights of
    every merged expert of more than one member (of every expert after a re-fit, which changes
    all down projections) and, with the weighted router rule, their router rows. Everything
    else equals the input's."""
    refit, router = result.options["refit"], result.options["router"]
    refit_router = result.options.get("repair") == "refit+router"
    groups = {}
    for li, clusters in result.clusters.items():
        groups[li] = {j: ({"experts"} if refit or len(m) > 1 else set()) |
                      ({"router"} if refit_router or (router == "weighted" and len(m) > 1) else set())
                      for j, m in enumerate(clusters)}
    return ModelReplacements(moe_view(model), groups)


@library_function(MergeOptions)
def merge_checkpoint(model: str | os.PathLike, output: str | os.PathLike, *, opts: MergeOptions,
                     progress: bool = True) -> MergeResult:
    """Merge the checkpoint ``model`` into the folder ``output``; see :func:`merge_experts`.

    ``calib`` is a calibration source (``n`` sequences of ``seq_len`` tokens drawn with
    ``seed``); ``stats`` a file from ``moecompress stats`` whose ``count`` gives the routing
    frequencies. ``dtype="auto"`` computes in float32 on the CPU; the weights are written in
    the checkpoint's own dtype.

    ``max_gpu_memory`` / ``max_cpu_memory`` stream the model (see ``checkpoint.load_model``):
    each layer is onloaded while it runs and merged from onloaded weights, and the merged
    blocks wait on disk, inside the output's temporary folder, deleted at the end. A local
    safetensors checkpoint (a Hub id once downloaded too) is written by shard surgery
    (``surgery.py``): the input's tensors are copied shard by shard, without the experts
    merged away, with the merged experts' new weights read from the model one layer at a
    time, never materialising the model. Streamed or not, the bytes are the same. Other
    checkpoints are merged in memory and saved with ``save_pretrained``; streaming refuses them.
    """
    from ..calibration import load_calibration
    from ..checkpoint import compute_dtype, copy_tokenizer, load_model, output_folder, save_model, write_record
    from ..device import place
    from ..formats import quant_method
    from ..source import open_source
    from ..surgery import prune_checkpoint_files

    start = time.perf_counter()
    source = open_source(model)
    opts = place(opts, source.config)  # --device auto
    keep, method, stats, refit = opts.keep, opts.method, opts.stats, opts.refit
    num_experts = source.num_experts
    streamed = opts.streamed
    dtype = compute_dtype(opts.dtype, opts.device, streamed=streamed)
    batch_size = opts.resolved_batch_size(opts.device, streamed)
    check_options(method=method, num_experts=num_experts, keep=keep, linkage=opts.linkage, metric=opts.distance,
                  router=opts.router, ridge=opts.ridge, batch_size=batch_size)
    if stats is not None and not Path(stats).expanduser().is_file():
        raise MoECompressError(f"statistics file '{stats}' not found; create it with `moecompress stats MODEL -o {stats}`")
    if streamed and source.folder is not None and not source.shards:
        raise MoECompressError(_NEEDS_SAFETENSORS.format(src=source))
    from ..prune.api import _check_mtp

    stored_mtp = _check_mtp(source, source.config, opts.mtp, opts.calib)
    with output_folder(output, overwrite=opts.overwrite, source=source, check=True) as folder:
        from ..stats import Stats

        stats_obj = Stats.load(stats) if stats is not None else None
        tokens = load_calibration(source.tokenizer(), opts.calib, **opts.calibration())
        work = folder / ".moecompress-work" if streamed else None  # offloaded weights; removed below
        model = load_model(source, dtype=dtype, device=opts.device, max_gpu_memory=opts.max_gpu_memory,
                           max_cpu_memory=opts.max_cpu_memory, offload_folder=work / "offload" if work else None,
                           gpu_working_bytes=streamed_working_bytes(source.config, keep, refit, dtype)
                           if streamed else 0)
        source._folder = None  # a Hub id is in the cache now
        # A quantized input (FP8 blocks, MXFP4) is merged dequantized and written in bf16: merged
        # weights have no scales to share with the input's (README, "Quantized inputs").
        quantized = quant_method(source.config) is not None
        surgery = bool(source.shards) and not quantized
        if streamed and not surgery:
            raise MoECompressError(_NEEDS_BF16.format(src=source) if quantized else _NEEDS_SAFETENSORS.format(src=source))
        stored = torch.bfloat16 if quantized else source.stored_dtype
        mtp_kept, mtp_record = {}, None
        if surgery and stored_mtp and opts.mtp == "prune":  # MTP experts are pruned (by their own router), not merged
            from ..mtp import kept_by_own_router

            mtp_kept, counts = kept_by_own_router(model, source.folder, source.config, tokens, keep,
                                                  batch_size=batch_size)
            mtp_record = {"mode": "prune", "rule": "own router top-k frequency", "kept_experts": mtp_kept, "counts": counts}
        elif surgery and stored_mtp:
            mtp_record = {"mode": "drop", "layers": stored_mtp}
        result = merge_experts(model, keep=keep, method=method, tokens=tokens, stats=stats_obj, linkage=opts.linkage,
                               metric=opts.distance, router=opts.router, refit=refit, ridge=opts.ridge,
                               batch_size=batch_size, progress=progress,
                               offload_folder=work / "merged" if work else None, repair=opts.repair)
        record = {"stage": "merge", "method": method, "seed": opts.seed,
                  "parameters": {**opts.recorded(), "num_experts_before": num_experts},
                  "writer": "shard surgery" if surgery else "save_pretrained",
                  **({"mtp": mtp_record} if mtp_record else {}),
                  **{k: v for k, v in result.to_dict(with_time=False).items() if k not in ("method", "options")}}
        if surgery:
            replace = merged_replacements(model, result)
            prune_checkpoint_files(source.folder, folder, {**result.dominant, **mtp_kept}, replace=replace,
                                   drop_mtp=opts.mtp == "drop")
            del replace, model
            copy_tokenizer(source, folder)
            write_record(folder, record, source)
        else:
            if stored is not None and model.dtype != stored:
                model.to(stored)
            save_model(model, folder, source=source, record=record)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


_NEEDS_BF16 = ("'{src}' is quantized; streamed merging (--max-gpu-memory / --max-cpu-memory) writes by shard "
               "surgery, which keeps the stored format; drop the memory caps (the merge is written in bf16)")
_NEEDS_SAFETENSORS = ("'{src}' has no safetensors files; streamed merging (--max-gpu-memory / --max-cpu-memory) "
                      "writes by shard surgery and needs a safetensors checkpoint; convert it or drop the memory caps")
