"""Library entry points of expert pruning.

* :func:`select_experts` — which experts each MoE layer keeps (edits nothing).
* :func:`prune_experts` — select, then remove the others from a loaded model in place.
* :func:`moecompress.prune.checkpoint.prune_checkpoint` — every method kind on a checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..arch import moe_view
from ..errors import MoECompressError
from . import naee, stun
from .methods import METHODS
from .selection import Plan, Selection

DEFAULT_METHOD = "auto"  # naee above the routed top-k, frequency at or below it (prune/auto.py)
# Method-specific options (keyword arguments of prune_experts / prune_checkpoint) and defaults.
METHOD_OPTIONS = {**naee.DEFAULTS, **stun.DEFAULTS}


@dataclass
class PruneResult:
    method: str
    num_experts: int  # per MoE layer, before
    keep: int  # per MoE layer, after
    kept: dict[int, list[int]]
    scores: dict[int, list[float]] = field(default_factory=dict)
    protected: dict[int, list[int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of selection (+ writing for prune_checkpoint)
    kind: str = "experts"  # what the method removed: experts, neurons or weights (prune.registry)
    report: dict = field(default_factory=dict)  # the fine-grained methods' own report

    @property
    def removed(self) -> dict[int, list[int]]:
        return {li: [e for e in range(self.num_experts) if e not in set(k)] for li, k in self.kept.items()}

    def score_summary(self) -> dict[int, dict]:
        """Per layer: share of the (non-negative) score mass kept, lowest kept and highest
        removed score. Empty for methods without per-expert scores (stun)."""
        out = {}
        for li, s in self.scores.items():
            t = torch.tensor(s, dtype=torch.float64)
            mask = torch.zeros(len(s), dtype=torch.bool)
            mask[self.kept[li]] = True
            pos = t.clamp_min(0)
            out[li] = {"kept_share": round(float(pos[mask].sum() / pos.sum()), 6) if pos.sum() > 0 else None,
                       "min_kept": _sig(float(t[mask].min())),
                       "max_removed": _sig(float(t[~mask].max())) if (~mask).any() else None}
        return out

    def to_dict(self, *, with_time: bool = True) -> dict:
        d = {"method": self.method, "num_experts": self.num_experts, "keep": self.keep,
             "kept_experts": {str(k): v for k, v in self.kept.items()},
             "removed_experts": {str(k): v for k, v in self.removed.items()},
             "protected_experts": {str(k): v for k, v in self.protected.items() if v},
             "scores_summary": {str(k): v for k, v in self.score_summary().items()},
             "info": _jsonable(self.info), "kind": self.kind}
        if self.report:
            d["report"] = _jsonable(self.report)
        if with_time:
            d["seconds"] = round(self.seconds, 3)
        return d


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float):
        return _sig(o)
    return o


# ----- input checks ------------------------------------------------------------------------
def resolve_keep(num_experts: int, keep: int | None = None, ratio: float | None = None) -> int:
    """Experts kept per layer from ``keep`` or ``ratio`` (the fraction of experts removed)."""
    if (keep is None) == (ratio is None):
        raise MoECompressError("give exactly one of --keep N (experts kept per layer) or --ratio R (fraction removed)")
    if ratio is not None:
        if not 0.0 < ratio < 1.0 or math.isnan(ratio):
            raise MoECompressError(f"--ratio must be between 0 and 1 (the fraction of experts removed), got {ratio}")
        keep = num_experts - int(round(ratio * num_experts))
        if not 1 <= keep < num_experts:
            raise MoECompressError(f"--ratio {ratio} of {num_experts} experts removes {num_experts - keep}; "
                                   f"choose a ratio that keeps between 1 and {num_experts - 1}")
        return keep
    if not 1 <= keep < num_experts:
        raise MoECompressError(f"--keep must be between 1 and {num_experts - 1} (the model has {num_experts} "
                               f"experts per MoE layer), got {keep}")
    return int(keep)


def check_method(method: str, options: dict | None = None) -> None:
    if method not in METHODS:
        raise MoECompressError(f"unknown pruning method '{method}'; use one of: {', '.join(METHODS)}")
    unknown = sorted(set(options or {}) - set(METHOD_OPTIONS))
    if unknown:
        raise MoECompressError(f"unknown pruning option(s) {', '.join(unknown)}; options: {', '.join(METHOD_OPTIONS)}")


def _needs_stats(method: str, options: dict) -> bool:
    m = METHODS[method]
    return m.needs == "stats" or any(options.get(o) for o in m.stats_options)


def _check_data(method: str, has_tokens: bool, has_stats: bool, protect: bool, options: dict) -> None:
    needs = METHODS[method].needs
    if needs == "tokens" and not has_tokens:
        raise MoECompressError(f"method '{method}' needs calibration text; pass --calib FILE")
    if _needs_stats(method, options) and not (has_tokens or has_stats):
        raise MoECompressError(f"method '{method}' needs routing statistics; pass --calib FILE or --stats FILE")
    if protect and not (has_tokens or has_stats):
        raise MoECompressError("--protect-super-experts needs routing statistics; pass --calib FILE or --stats FILE")


def _check_stats_match(stats, view) -> None:
    for layer in view:
        try:
            n = stats.get(layer.layer_idx, "count").numel()
        except KeyError:
            raise MoECompressError(f"the statistics have no MoE layer {layer.layer_idx}; they were computed for "
                                   "another model — recompute them with `moecompress stats`") from None
        if n != layer.num_experts:
            raise MoECompressError(f"the statistics describe {n} experts in layer {layer.layer_idx}, the model has "
                                   f"{layer.num_experts}; recompute them with `moecompress stats` on this model")


def _protected(stats, view, keep: int, groups: int = 1) -> dict[int, set[int]]:
    out = {}
    size = view.num_experts // groups
    for layer in view:
        mask = stats.get(layer.layer_idx, "super_experts").bool()
        out[layer.layer_idx] = set(torch.nonzero(mask).flatten().tolist())
        worst = max((sum(1 for e in out[layer.layer_idx] if e // size == g), g) for g in range(groups))
        if worst[0] > keep // groups:
            where = f" in expert group {worst[1]}" if groups > 1 else ""
            raise MoECompressError(f"layer {layer.layer_idx} has {worst[0]} super-expert candidates{where}, more than the "
                                   f"{keep // groups} kept there; keep more experts or drop --protect-super-experts")
    return out


def _check_mtp(src, config, mtp: str, calib) -> list[int]:
    """The MTP layers a local checkpoint stores; refuses what cannot be done with them."""
    from ..checkpoint import source_folder
    from ..mtp import stored_layers

    if mtp not in ("prune", "drop"):
        raise MoECompressError(f"--mtp must be prune or drop, got '{mtp}'")
    local = source_folder(src)
    stored = list(stored_layers(local, config)) if local is not None and any(local.glob("*.safetensors")) else []
    if stored and mtp == "prune" and calib is None:
        raise MoECompressError(f"the checkpoint stores multi-token-prediction layer(s) {stored}: pass --calib FILE so "
                               "their experts are chosen by their own router, or --mtp drop to remove them")
    return stored


# ----- library API -------------------------------------------------------------------------
def plan_pruning(model, *, keep: int, method: str = DEFAULT_METHOD, tokens: torch.Tensor | None = None,
                 stats=None, seed: int = 0, protect_super_experts: bool = False, batch_size: int = 8,
                 progress: bool = False, on_layer=None, **options) -> tuple[Plan, dict[int, set[int]]]:
    """Run ``method`` on ``model`` (unchanged, unless ``on_layer`` edits it) and return its plan
    and the protected experts. ``keep`` may equal the expert count here (a no-op plan); the CLI
    refuses that. ``on_layer(layer_idx, kept)``: see ``Selection.on_layer``."""
    check_method(method, options)
    view = moe_view(model)
    if not 1 <= keep <= view.num_experts:
        raise MoECompressError(f"keep must be between 1 and {view.num_experts}, got {keep}")
    _check_data(method, tokens is not None, stats is not None, protect_super_experts, options)
    if stats is None and tokens is not None and (_needs_stats(method, options) or protect_super_experts):
        from ..stats import collect_stats

        stats = collect_stats(model, tokens, batch_size=batch_size, progress=progress)
    if stats is not None:
        _check_stats_match(stats, view)
    groups = view.balanced_groups(keep)
    protected = _protected(stats, view, keep, groups) if protect_super_experts else {}
    sel = Selection(model=model, view=view, keep=keep, tokens=tokens, stats=stats, seed=seed, protected=protected,
                    batch_size=batch_size, progress=progress, options=options, groups=groups, on_layer=on_layer)
    plan = METHODS[method].select(sel)
    if groups > 1:
        plan.info["groups"] = {"n_group": groups, "kept_per_group": keep // groups}
    elif view.num_groups > 1 and keep < view.num_experts:
        plan.info["groups"] = {"n_group": 1, "note": f"{keep} kept experts cannot be the same number from each of "
                               f"the {view.num_groups} routing groups; the config becomes n_group 1, topk_group 1 "
                               "(plain top-k over the kept experts)"}
    for li, k in plan.kept.items():  # every method must honour the contract
        assert len(k) == keep and k == sorted(set(k)) and protected.get(li, set()) <= set(k), (method, li, k)
    return plan, protected


def select_experts(model, tokens: torch.Tensor | None = None, *, keep: int, method: str = DEFAULT_METHOD,
                   stats=None, seed: int = 0, protect_super_experts: bool = False, batch_size: int = 8,
                   progress: bool = False, **options) -> dict[int, list[int]]:
    """Kept experts per MoE layer (ascending) chosen by ``method``; the model is unchanged."""
    plan, _ = plan_pruning(model, keep=keep, method=method, tokens=tokens, stats=stats, seed=seed,
                           protect_super_experts=protect_super_experts, batch_size=batch_size,
                           progress=progress, **options)
    return plan.kept


def plan_experts(model, *, keep: int, method: str = DEFAULT_METHOD, tokens: torch.Tensor | None = None,
                 stats=None, seed: int = 0, protect_super_experts: bool = False, batch_size: int = 8,
                 progress: bool = False, on_layer=None, **options) -> PruneResult:
    """What :func:`prune_experts` would do, without editing ``model`` (``on_layer``: see
    ``Selection.on_layer``)."""
    start = time.perf_counter()
    num_experts = moe_view(model).num_experts
    plan, protected = plan_pruning(model, keep=keep, method=method, tokens=tokens, stats=stats, seed=seed,
                                   protect_super_experts=protect_super_experts, batch_size=batch_size,
                                   progress=progress, on_layer=on_layer, **options)
    return PruneResult(method=method, num_experts=num_experts, keep=keep, kept=plan.kept,
                       scores={li: s.tolist() for li, s in plan.scores.items()},
                       protected={li: sorted(p) for li, p in protected.items()}, info=plan.info,
                       seconds=time.perf_counter() - start)


def prune_experts(model, *, keep: int, method: str = DEFAULT_METHOD, tokens: torch.Tensor | None = None,
                  stats=None, seed: int = 0, protect_super_experts: bool = False, batch_size: int = 8,
                  progress: bool = False, **options) -> PruneResult:
    """Keep ``keep`` experts in every MoE layer of ``model`` (edited in place), chosen by
    ``method``. Router rows and per-expert router tensors are sliced, the config updated and
    top-k lowered to ``keep`` if it was larger."""
    result = plan_experts(model, keep=keep, method=method, tokens=tokens, stats=stats, seed=seed,
                          protect_super_experts=protect_super_experts, batch_size=batch_size, progress=progress,
                          **options)
    moe_view(model).keep_experts(result.kept)
    return result
