"""``prune_checkpoint``: the one pruning entry point for every method kind (see ``registry``).

Whole experts (``experts``): the method plans on the loaded (possibly streamed) model and a
local safetensors checkpoint is written by shard surgery without the removed experts; neurons
and weights (``neurons`` / ``weights``): the model is edited in place and saved. Every kind
takes the same options (:class:`~moecompress.options.PruneOptions`), including the streaming
caps, and returns one :class:`PruneResult`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import torch

from ..errors import MoECompressError
from ..options import PruneOptions, library_function
from .api import METHOD_OPTIONS, PruneResult, _check_data, _check_mtp, _needs_stats, plan_experts, resolve_keep
from .registry import effective_method, registry

_FINE_ONLY = (("sparsity", "--sparsity"), ("nm", "--nm"), ("stun_expert_ratio", "--stun-expert-ratio"),
              ("heapr_global", "--heapr-global"))


def _check_kind(method: str, opts: PruneOptions) -> None:
    """Options that belong to another kind of method are refused, not ignored."""
    kind = registry()[method].kind
    if kind == "experts":
        given = [flag for name, flag in _FINE_ONLY if getattr(opts, name)]
        if given:
            fine = [m for m, i in registry().items() if i.kind != "experts"]
            raise MoECompressError(f"{given[0]} applies to the fine-grained methods ({', '.join(fine)}; stun with "
                                   f"--sparsity/--nm), not to '{opts.method}'")
        return
    if opts.keep is not None:
        raise MoECompressError("--keep counts whole experts; fine-grained methods take --ratio (heapr), "
                               "--sparsity or --nm (and --stun-expert-ratio for stun)")
    if opts.stats is not None or opts.protect_super_experts:
        raise MoECompressError("--stats and --protect-super-experts belong to whole-expert pruning; the fine-grained "
                               "methods measure on the calibration text")
    if method != "heapr" and opts.heapr_global:
        raise MoECompressError("--heapr-global only applies to --method heapr")
    if method == "heapr":
        if opts.sparsity is not None or opts.nm is not None:
            raise MoECompressError("heapr removes whole neurons: use --ratio, not --sparsity/--nm")
        if opts.ratio is None:
            raise MoECompressError("heapr needs --ratio R (the fraction of each expert's neurons to remove)")
    elif method != "stun-unstructured" and opts.ratio is not None:
        raise MoECompressError(f"{method} prunes single weights: use --sparsity S or --nm N:M, not --ratio")


@library_function(PruneOptions)
def prune_checkpoint(model: str | os.PathLike, output: str | os.PathLike, *, opts: PruneOptions,
                     progress: bool = True) -> PruneResult:
    """Prune the checkpoint ``model`` into the folder ``output`` with ``opts.method`` (any kind).

    The weights are written in the checkpoint's own dtype whatever ``dtype`` the computation
    used. ``max_gpu_memory`` / ``max_cpu_memory`` stream the model (``checkpoint.load_model``)
    for every kind. Options are those of :class:`~moecompress.options.PruneOptions`.
    """
    from ..calibration import load_calibration
    from ..checkpoint import compute_dtype, load_model, output_folder, require_free_space
    from ..device import place
    from ..source import open_source

    start = time.perf_counter()
    source = open_source(model)
    method = effective_method(opts.method, opts.sparsity, opts.nm)
    info = registry()[method]
    _check_kind(method, opts)
    if info.kind != "experts":  # edited weights are saved: not in a quantized input's own format
        from ..formats import require_rewritable

        require_rewritable(source.config, source, f"--method {method}")
    opts = place(opts, source.config)  # --device auto
    dtype = compute_dtype(opts.dtype, opts.device, streamed=opts.streamed)
    batch_size = opts.resolved_batch_size(opts.device, opts.streamed, source.config if info.kind == "experts" else None)
    if info.kind == "experts":
        method_options = {k: getattr(opts, k) for k in METHOD_OPTIONS if getattr(opts, k, None) is not None}
        keep = resolve_keep(source.num_experts, opts.keep, opts.ratio)
        wants_tokens = info.needs == "tokens" or (opts.stats is None and (_needs_stats(method, method_options)
                                                                           or opts.protect_super_experts))
        _check_data(method, wants_tokens, opts.stats is not None, opts.protect_super_experts, method_options)
        if opts.stats is not None and not opts.stats.expanduser().is_file():
            raise MoECompressError(f"statistics file '{opts.stats}' not found; create it with "
                                   f"`moecompress stats MODEL -o {opts.stats}`")
    else:
        wants_tokens = info.needs == "tokens"
    stored_mtp = _check_mtp(source, source.config, opts.mtp, opts.calib) if info.kind == "experts" else []
    # MTP layers' experts are chosen by their own router on the calibration tokens
    wants_tokens = wants_tokens or (bool(stored_mtp) and opts.mtp == "prune")
    repair = _repair_mode(opts, info.kind, wants_tokens, source, stored_mtp)
    wants_tokens = wants_tokens or repair != "none"  # the repair re-fits on the calibration text
    with output_folder(output, overwrite=opts.overwrite, source=source, check=True) as folder:
        if info.kind == "experts" and source.shards:  # the surgery's output size is known before any work
            from ..surgery import pruned_tensor_bytes

            require_free_space(folder, pruned_tensor_bytes(source.folder, keep, drop_mtp=opts.mtp == "drop"),
                               "the pruned checkpoint")
        tokens = repair_tokens = None
        if repair != "none":  # the re-fit reads more of the text than the selection (repair.REPAIR_SEQUENCES)
            from ..repair import selection_and_repair_tokens

            tokens, repair_tokens = selection_and_repair_tokens(source.tokenizer(), opts.calib, **opts.calibration(),
                                                                sequences=opts.repair_n)
        elif wants_tokens:
            tokens = load_calibration(source.tokenizer(), opts.calib, **opts.calibration())
        # offloaded and edited weights of a streamed model; removed below
        work = folder / ".moecompress-work" if opts.streamed and (repair != "none" or info.kind != "experts") else None
        working = 0
        if opts.streamed:
            working = (_experts_working_bytes(source, method, keep, repair, dtype, method_options)
                       if info.kind == "experts" else _edit_bytes(source, dtype))
        lm = load_model(source, dtype=dtype, device=opts.device, max_gpu_memory=opts.max_gpu_memory,
                        max_cpu_memory=opts.max_cpu_memory, offload_folder=work / "offload" if work else None,
                        gpu_working_bytes=working,
                        layer_ahead=info.kind == "experts" and _selects_by_layers(source, method, keep))
        record = {"stage": "prune", "method": method, "kind": info.kind, "seed": opts.seed,
                  "parameters": {**opts.recorded(), "num_experts_before": source.num_experts, "repair": repair}}
        if info.kind == "experts":
            result = _prune_experts(source, folder, lm, opts, method, keep, tokens, batch_size, method_options,
                                    record, progress, stored_mtp, repair, work, repair_tokens)
        else:
            result = _prune_inside(source, folder, lm, opts, method, tokens, batch_size, record, progress,
                                   work / "edited" if work else None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _repair_mode(opts: PruneOptions, kind: str, wants_tokens: bool, source, stored_mtp) -> str:
    """--repair, or by default: refit when the calibration text is read anyway (a method or the
    MTP router needs it) or was given, else none. Whole-expert methods only; not for a quantized
    input (pruned in its stored format, which the re-fitted weights would not keep) nor for a
    checkpoint with MTP layers (not supported yet)."""
    from ..formats import quant_method

    if kind != "experts" or quant_method(source.config) is not None or stored_mtp:
        if opts.repair not in (None, "none"):
            raise MoECompressError(f"--repair {opts.repair} is not supported for this input (a fine-grained method, "
                                   "a quantized checkpoint or MTP layers); use --repair none")
        return "none"
    if opts.repair is not None:
        return opts.repair
    return "refit" if wants_tokens or "calib" in opts.model_fields_set else "none"


def _selects_by_layers(source, method: str, keep: int) -> bool:
    """Whether the selection reads the weights only by running the layers in order (NAEE), so
    that layers can still be loading while it works on the first (``layerload``)."""
    from .auto import auto_rule

    return method == "naee" or (method == "auto" and auto_rule(keep, source.top_k) == "naee")


def _experts_working_bytes(source, method: str, keep: int, repair: str, dtype, method_options: dict) -> int:
    """GPU bytes a streamed expert prune holds besides the streamed weights and accelerate's room
    for one onloaded layer, at the larger of its two steps: NAEE's cached Gram matrices and
    working tensors (when it selects: ``naee``, or ``auto`` above the top-k); the repair's
    accumulators and solve (``repair.working_bytes``) beside the pruned block it builds at the
    layer (keep / E of an original block)."""
    from ..checkpoint import largest_block_bytes
    from ..repair import working_bytes
    from ..surgery import meta_view
    from .auto import auto_rule
    from .naee import working_bytes as naee_bytes

    view = meta_view(source.config)
    layer = view.layers[0]
    selection = 0
    if method == "naee" or (method == "auto" and auto_rule(keep, layer.top_k) == "naee"):
        selection = naee_bytes(layer.num_experts, layer.hidden_size, method_options)
    repair_bytes = 0
    if repair != "none":
        block = largest_block_bytes(view, source.config, dtype)
        repair_bytes = block * keep // max(layer.num_experts, 1) + working_bytes(view, keep, repair)
    return max(selection, repair_bytes)


def _edit_bytes(source, dtype) -> int:
    """GPU bytes fine-grained pruning holds besides the streamed weights and accelerate's room
    for one onloaded layer: the edited copy of an MoE block (HEAPr's smaller tensors, STUN's
    kept experts, are built while the original is onloaded), at most one block."""
    from ..checkpoint import largest_block_bytes
    from ..surgery import meta_view

    return largest_block_bytes(meta_view(source.config), source.config, dtype)


def _prune_experts(source, folder, lm, opts, method, keep, tokens, batch_size, method_options, record,
                   progress, stored_mtp, repair="none", work=None, repair_tokens=None) -> PruneResult:
    from .. import layerload
    from ..arch import moe_view
    from ..checkpoint import copy_tokenizer, save_model, write_record
    from ..stats import Stats
    from ..surgery import prune_checkpoint_files

    stats = Stats.load(opts.stats) if opts.stats is not None else None
    surgery = bool(source.shards)
    select = dict(keep=keep, method=method, tokens=tokens, stats=stats, seed=opts.seed,
                  protect_super_experts=opts.protect_super_experts, batch_size=batch_size, progress=progress,
                  **method_options)
    if repair == "none":
        result = plan_experts(lm, **select)
        layerload.finish(lm)  # the layers the selection did not run are loaded too, before any is edited
        if not surgery:
            moe_view(lm).keep_experts(result.kept)
    else:
        result = _select_and_repair(source, folder, lm, opts, keep, repair, select, surgery, stored_mtp, work,
                                    repair_tokens, batch_size, progress)
    result.kind = "experts"
    record.update({"writer": "shard surgery" if surgery else "save_pretrained",
                   **{k: v for k, v in result.to_dict(with_time=False).items() if k not in ("method", "kind")}})
    mtp_kept = {}
    if surgery and stored_mtp and opts.mtp == "prune":
        from ..mtp import kept_by_own_router

        mtp_kept, counts = kept_by_own_router(lm, source.folder, source.config, tokens, keep, batch_size=batch_size)
        record["mtp"] = {"mode": "prune", "rule": "own router top-k frequency", "kept_experts": mtp_kept,
                         "counts": counts}
    elif stored_mtp and surgery:
        record["mtp"] = {"mode": "drop", "layers": stored_mtp}
    if surgery:
        if repair == "none":  # else written beside the re-fit (_select_and_repair)
            prune_checkpoint_files(source.folder, folder, {**result.kept, **mtp_kept}, drop_mtp=opts.mtp == "drop")
        del lm
        copy_tokenizer(source, folder)
        write_record(folder, record, source)
    else:
        if source.stored_dtype is not None and lm.dtype != source.stored_dtype:
            lm.to(source.stored_dtype)
        save_model(lm, folder, source=source, record=record)
    return result


def refit_schedule(lm) -> str:
    """When the prune re-fits each layer: ``"after"`` the whole selection, or ``"as chosen"``, as
    soon as a method that chooses a layer at a time has chosen it (``Selection.on_layer``). The
    values are the same (tests); the time is not.

    * Streamed: as chosen. A decoder layer then goes to the GPU once for its selection and its
      re-fit (``naee``: the selection holds it for the re-fit), where the re-fit after the
      selection onloads every MoE block a second time and the rest of the layer once per pass
      (testbed: 59.5 MiB onloaded instead of 27.1; docs/benchmarks.md, "Session 17").
    * In memory: after. In GPU memory the layers load in the background while the selection runs
      (``layerload``), and the re-fit beside those loads gained nothing: session 15 measured it
      slower (the whole prune 22.0 s against 21.1 s), session 18 the same within a process's
      run-to-run spread (the OLMoE shape, both orders in two processes). Session 19 tried the
      re-fit in a thread of its own, one layer behind the selection: the interpreter's lock made
      NAEE's search 2.6 times slower beside it (docs/benchmarks.md, "Session 19")."""
    from ..onload import is_streamed

    return "as chosen" if is_streamed(lm) else "after"


def _select_and_repair(source, folder, lm, opts, keep, repair, select, surgery, stored_mtp, work, repair_tokens,
                       batch_size, progress) -> PruneResult:
    """Choose the kept experts and re-fit them (``repair.PruneRepair``): each layer as soon as it
    is chosen by a method that chooses a layer at a time (NAEE: ``Selection.on_layer``), or after
    the selection (:func:`refit_schedule`). With shard surgery the output is written
    beside the re-fit: every tensor the choice does not decide first (from the kept count, when
    the re-fit starts before every layer is chosen), then a layer's experts and router as soon as
    the layer is final (docs/benchmarks.md, "Session 9"); the record and the rest follow it."""
    from .. import layerload
    from ..arch import moe_view
    from ..repair import ROUTER_CHANGING_MODES, PruneRepair
    from ..surgery import PublishedReplacements, SurgeryAlongside, prune_checkpoint_files

    # A checkpoint that stores MTP layers (whose experts are chosen after, from the kept sets)
    # never gets here: _repair_mode turns the repair off for it.
    assert not stored_mtp, "the repair is off for checkpoints with stored MTP layers (_repair_mode)"
    as_chosen = refit_schedule(lm) == "as chosen"
    result = None
    if not as_chosen:
        result = plan_experts(lm, **select)
        layerload.finish(lm)  # the layers the selection did not run are loaded too, before any is edited
    view = moe_view(lm)
    kept: dict[int, list[int]] = {} if as_chosen else dict(result.kept)  # the surgery slices each router by it
    published = alongside = None
    if surgery:
        parts = {"experts", "router"} if repair in ROUTER_CHANGING_MODES else {"experts"}
        published = PublishedReplacements({li: {j: parts for j in range(keep)} for li in view.moe_layer_indices},
                                          kept)
        alongside = SurgeryAlongside(lambda: prune_checkpoint_files(source.folder, folder, keep if as_chosen else kept,
                                                                    replace=published, drop_mtp=opts.mtp == "drop"),
                                     published)
    with alongside or contextlib.nullcontext():
        run = PruneRepair(lm, keep, repair_tokens, mode=repair, ridge=opts.repair_ridge, router_ridge=opts.router_ridge,
                          batch_size=batch_size, target=opts.repair_target, tune_epochs=opts.tune_epochs,
                          tune_lr=opts.tune_lr, seed=opts.seed, progress=progress and not as_chosen,
                          offload_folder=work / "pruned" if work else None,
                          on_layer_done=published.publish if published else None,
                          keep_model=not surgery,  # with the surgery the model is not run again
                          grouped=view.balanced_groups(keep) > 1)
        if as_chosen:
            def chosen(li: int, experts: list[int]) -> None:
                kept[li] = experts
                run.chosen(li, experts)

            result = plan_experts(lm, on_layer=chosen, **select)  # its bar shows the re-fit's layers too
            layerload.finish(lm)
            kept.update(result.kept)
            run.progress = progress  # layers left (a method that chooses all at once) show their own bars
        result.info["repair"] = run.finish(result.kept)
        if published is not None:
            published.publish_rest(moe_view(lm))
    if repair == "refit+tune":  # the held-out loss per layer and epoch, as a picture
        from ..blocktune import plot_tuning
        from ..plotting import REPAIR_TUNING

        plot_tuning(result.info["repair"], folder / REPAIR_TUNING)
    return result


def _prune_inside(source, folder, lm, opts, method, tokens, batch_size, record, progress, edited=None) -> PruneResult:
    """Neurons / weights: the model is edited in place and saved. Streamed: one layer at a
    time, each edited layer kept on disk in ``edited`` until ``save_pretrained`` reads it."""
    from ..arch import moe_view
    from ..checkpoint import save_model
    from ..finegrained.api import finegrained_prune
    from ..onload import cast_model

    num_experts = source.num_experts
    torch.manual_seed(opts.seed)
    report = finegrained_prune(lm, tokens, method, ratio=opts.ratio, sparsity=opts.sparsity, nm=opts.nm,
                               heapr_global=opts.heapr_global,
                               stun_expert_ratio=(opts.stun_expert_ratio if opts.stun_expert_ratio is not None
                                                  else opts.ratio),
                               stun_unstructured=opts.stun_unstructured, batch_size=batch_size, progress=progress,
                               offload_folder=edited)
    view = moe_view(lm)
    kept = report.get("kept_experts") or {li: list(range(num_experts)) for li in view.moe_layer_indices}
    result = PruneResult(method=method, num_experts=num_experts, keep=view.num_experts,
                         kept={int(k): list(v) for k, v in kept.items()}, kind=registry()[method].kind,
                         report=report)
    if source.stored_dtype is not None and lm.dtype != source.stored_dtype:  # compute in --dtype, store as the input
        cast_model(lm, source.stored_dtype)
    record.update({"writer": "save_pretrained",
                   **{k: v for k, v in result.to_dict(with_time=False).items() if k not in ("method", "kind")}})
    save_model(lm, folder, source=source, record=record)
    return result
