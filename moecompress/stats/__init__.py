"""Routing statistics of an MoE model on calibration tokens (``moecompress stats``).

``collect_stats(model, tokens)`` runs the tokens once through the model (batched, through
:func:`moecompress.capture.run_calibration`) and returns a :class:`Stats` holding, for every
MoE layer, the per-expert statistics documented in :mod:`moecompress.stats.observer`:
``count``, ``soft_count``, ``gate_mean``, ``ean``, ``reap``, ``easy_ep``, ``tcess``, REAP's
``weighted_ean_sum``, ``ean_mean``, ``reap_l2``, ``ean_ca``, ``max_activations``,
``coactivation``, ``entropy``, ``load_cv``, ``super_in_max``, ``super_out_max``,
``super_experts``, ``srp`` and ``sch``.
"""

from __future__ import annotations

import operator

import torch

from ..arch import moe_view
from ..capture import run_calibration
from ..errors import MoECompressError
from .container import Stats, summary_path
from .observer import StatsObserver

__all__ = ["Stats", "collect_stats", "summary_path", "STAT_NAMES"]

STAT_NAMES = ("count", "soft_count", "gate_mean", "ean", "reap", "easy_ep", "tcess", "weighted_ean_sum", "ean_mean",
              "reap_l2", "ean_ca", "max_activations", "coactivation",
              "entropy", "load_cv", "super_in_max", "super_out_max", "super_experts", "srp", "sch")


def _residual_hooks(model, view, observer: StatsObserver) -> list:
    """EASY-EP needs the residual stream entering each MoE block: the input of the decoder
    layer's post-attention norm (every supported family names it ``post_attention_layernorm``)."""
    hooks = []
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    for layer in view:
        norm = getattr(decoder_layers[layer.layer_idx], "post_attention_layernorm", None)
        if norm is None:
            continue  # falls back to the block input, see StatsObserver.observe

        def pre(mod, args, li=layer.layer_idx):
            observer.residual[li] = args[0]

        hooks.append(norm.register_forward_pre_hook(pre))
    return hooks


@torch.no_grad()
def collect_stats(
    model,
    tokens: torch.Tensor,
    *,
    batch_size: int = 8,
    segment_len: int = 16,
    progress: bool = True,
    tcess_threshold: float = 0.0,
    sch_cache_sizes: tuple[int, ...] | None = None,
    meta: dict | None = None,
    timings: dict | None = None,
    fuse_experts: bool = True,
) -> Stats:
    """Routing statistics of ``model`` on ``tokens`` [n, seq_len].

    ``segment_len`` is the window m of SRP / SCH; ``tcess_threshold`` the PreMoe threshold r;
    ``sch_cache_sizes`` the cache sizes of SCH (default k, 2k, 4k). ``meta`` entries (model
    name, calibration source, seed...) are stored with the statistics. ``timings``, when given,
    receives the seconds spent in the forward+observe pass and in finalisation (never stored).
    ``fuse_experts`` runs the experts once, through the statistics' own grouped computation,
    instead of once in the forward and again for the statistics (see
    :meth:`StatsObserver.fuse_experts`); with False the model's forward is left untouched.
    """
    import time

    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise MoECompressError("calibration tokens must be a [n, seq_len] tensor with n, seq_len >= 1")
    if segment_len < 1:
        raise MoECompressError("--segment-len must be at least 1 token")
    if batch_size < 1:
        raise MoECompressError("--batch-size must be at least 1")
    view = moe_view(model)
    n, seq_len = tokens.shape
    obs = StatsObserver(seq_len, segment_len=segment_len, tcess_threshold=tcess_threshold,
                        sch_cache_sizes=sch_cache_sizes)
    obs.residual_scale = float(getattr(model.config, "residual_multiplier", 1.0) or 1.0)
    hooks = _residual_hooks(model, view, obs)
    undo = obs.fuse_experts(view) if fuse_experts else []
    t0 = time.perf_counter()
    try:
        run_calibration(model, tokens, [obs], batch_size=batch_size, view=view, progress=progress,
                        description="routing statistics")
    finally:
        for h in hooks:
            h.remove()
        for u in undo:
            u()
    if timings is not None and tokens.is_cuda or (timings is not None and next(model.parameters()).is_cuda):
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    per_layer = obs.finalize()
    if timings is not None:
        timings.update(forward_observe=t1 - t0, finalize=time.perf_counter() - t1)
    stats = Stats()
    for li, d in per_layer.items():
        for name, t in d.items():
            stats.set(li, name, t)
    first = view.layers[0]
    k = first.top_k
    sizes = sch_cache_sizes or None
    from .locality import default_cache_sizes

    stats.meta = {
        **(meta or {}),
        "family": view.spec.name,
        "model_type": getattr(model.config, "model_type", None),
        "layers": view.moe_layer_indices,
        "num_experts": first.num_experts,
        "top_k": k,
        "n": int(n),
        "seq_len": int(seq_len),
        "tokens": int(n * seq_len),
        "segment_len": int(obs.segment_len),
        "tcess_threshold": float(tcess_threshold),
        "sch_cache_sizes": list(sorted({min(max(c, k), first.num_experts) for c in sizes})) if sizes
        else list(default_cache_sizes(k, first.num_experts)),
        "stats": list(STAT_NAMES),
    }
    return stats
