"""``merge_checkpoint``: load, merge (:func:`.api.merge_experts`), write a standard HF checkpoint
(fewer experts, config updated) with a ``moecompress.json`` record of the clusters; the
streamed run's memory budget and the shard-surgery replacements it writes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from ..arch import moe_view
from ..errors import MoECompressError
from ..options import MergeOptions, library_function
from ..surgery import ModelReplacements
from .api import MergeResult, check_options, merge_experts


def streamed_working_bytes(config, keep: int, refit: bool, dtype: str = "auto", repair: str | None = None) -> int:
    """GPU bytes a streamed merge holds besides what ``load_model`` already budgets (resident
    weights and room for one onloaded decoder layer): the merged block, built while the
    original is onloaded and, in the re-fit, onloaded with the original block that serves as
    its reference, and the re-fit's accumulators of a layer group with one block of experts'
    features (``refit.block_working_bytes``); with ``repair`` (``--repair``,
    which replaces that re-fit) what the repair holds instead (``repair.working_bytes``: one
    layer's accumulators, and for ``refit+tune`` the tuned block's float32 copy and optimiser).

    Measured on an H100 (OLMoE-1B-7B shape, 4 GiB cap): with none of this reserved the peak
    was 9.49 GiB; reserving a whole original block besides (double counting accelerate's
    room for a layer) left less weights budget than one layer, and accelerate then silently
    placed every weight on the CPU (peak 0.19 GiB, the merge computed on the CPU), which
    ``load_model`` now refuses."""
    from ..checkpoint import largest_block_bytes
    from ..surgery import meta_view
    from ..refit import block_working_bytes, peak_accumulator_bytes

    view = meta_view(config)
    merged = largest_block_bytes(view, config, dtype) * keep // max(view.layers[0].num_experts, 1)
    if repair is not None:
        from ..repair import working_bytes

        return merged + working_bytes(view, keep, repair)
    if not refit:
        return merged
    layer = view.layers[0]  # the re-fit's accumulators, and one block of experts' transient features
    return merged + peak_accumulator_bytes(view, keep) + block_working_bytes(layer.hidden_size, layer.intermediate_size)


def merged_replacements(model, result: MergeResult) -> ModelReplacements:
    """What shard surgery must write besides the input's tensors, read from the ``model`` that
    :func:`merge_experts` merged into ``result``, one layer at a time: the expert weights of
    every merged expert of more than one member (of every expert after a re-fit, which changes
    all down projections) and, with the weighted router rule, their router rows. Everything
    else equals the input's."""
    from ..repair import ROUTER_CHANGING_MODES

    refit, router = result.options["refit"], result.options["router"]
    refit_router = result.options.get("repair") in ROUTER_CHANGING_MODES
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
    from ..checkpoint import (compute_dtype, copy_tokenizer, load_model, output_folder, require_free_space, save_model,
                              write_record)
    from ..device import place
    from ..formats import quant_method, require_rewritable
    from ..source import open_source
    from ..surgery import prune_checkpoint_files

    start = time.perf_counter()
    source = open_source(model)
    require_rewritable(source.config, source, "merge")
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
        if source.shards and quant_method(source.config) is None:  # written by surgery: its size is known now
            from ..surgery import pruned_tensor_bytes

            require_free_space(folder, pruned_tensor_bytes(source.folder, keep, drop_mtp=opts.mtp == "drop"),
                               "the merged checkpoint")
        from ..stats import Stats

        stats_obj = Stats.load(stats) if stats is not None else None
        tokens = load_calibration(source.tokenizer(), opts.calib, **opts.calibration())
        work = folder / ".moecompress-work" if streamed else None  # offloaded weights; removed below
        model = load_model(source, dtype=dtype, device=opts.device, max_gpu_memory=opts.max_gpu_memory,
                           max_cpu_memory=opts.max_cpu_memory, offload_folder=work / "offload" if work else None,
                           gpu_working_bytes=streamed_working_bytes(source.config, keep, refit, dtype, opts.repair)
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
                               offload_folder=work / "merged" if work else None, repair=opts.repair,
                               repair_target=opts.repair_target, tune_epochs=opts.tune_epochs, tune_lr=opts.tune_lr,
                               seed=opts.seed)
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
