"""The expert-pruning methods, as data: name -> how it picks the experts each layer keeps.

Every method returns a :class:`Plan` (kept experts per MoE layer, optional per-expert scores)
for a :class:`Selection` (the model, the kept count, calibration tokens and/or routing
statistics, the seed, the experts that must stay). Methods never edit the model; applying
a plan is :func:`moecompress.prune.api.prune_experts`'s job.

Score methods rank experts by one statistic of :mod:`moecompress.stats` (higher = keep) and
keep the top ``keep`` per layer; ``naee`` searches kept sets by reconstruction error;
``stun`` clusters experts by behaviour similarity and keeps one per cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from . import auto, naee, scores, stun
from .selection import Plan, Selection

# What a method needs besides the model: nothing, routing statistics (from --stats or
# computed from --calib), or the calibration tokens themselves.
Needs = Literal["nothing", "stats", "tokens"]


@dataclass(frozen=True)
class Method:
    name: str
    select: Callable[[Selection], Plan]
    needs: Needs
    summary: str  # one line: what it ranks by, and the paper
    # Options that, when set (truthy), make the method read routing statistics too.
    stats_options: tuple[str, ...] = ()


def _registry() -> dict[str, Method]:
    methods = [
        Method("random", scores.random_select, "nothing",
               "seeded uniformly random experts (baseline)"),
        Method("frequency", scores.stat_selector("count"), "stats",
               "top-k hit count on the calibration tokens"),
        Method("soft-frequency", scores.stat_selector("soft_count"), "stats",
               "sum of routing probabilities over the calibration tokens"),
        Method("ean", scores.stat_selector("ean"), "stats",
               "expert activation norm, sum of ||expert output|| over routed tokens (Jaiswal et al. 2025)"),
        Method("reap", scores.stat_selector("reap"), "stats",
               "REAP: mean over routed tokens of gate x ||expert output|| (Lasby et al. 2025, Eq. 9)"),
        Method("weighted-ean-sum", scores.stat_selector("weighted_ean_sum"), "stats",
               "REAP's code: sum over routed tokens of gate x ||expert output|| (CerebrasResearch/reap)"),
        Method("ean-mean", scores.stat_selector("ean_mean"), "stats",
               "REAP's code: mean over routed tokens of ||expert output||"),
        Method("reap-l2", scores.stat_selector("reap_l2"), "stats",
               "root-mean-square over routed tokens of gate x ||expert output|| (named, not defined, in REAP's code)"),
        Method("ean-ca", scores.stat_selector("ean_ca"), "stats",
               "REAP's code: norm of the mean expert output over its routed tokens"),
        Method("max-activations", scores.stat_selector("max_activations"), "stats",
               "REAP's code: largest expert output value over routed tokens (super-expert criterion)"),
        Method("easy-ep", scores.stat_selector("easy_ep"), "stats",
               "EASY-EP output-aware importance weighted by token contribution (Dong et al. 2025)"),
        Method("tcess", scores.stat_selector("tcess"), "stats",
               "PreMoe task-conditioned expected selection score (Pei et al. 2025)"),
        Method("naee", naee.naee_select, "tokens",
               "NAEE: kept set minimising the layer-output reconstruction error, layer by layer (Lu et al. 2024)"),
        Method("auto", auto.auto_select, "tokens",
               "robust default: naee when the kept count exceeds the routed top-k, else frequency (docs/benchmarks.md)"),
        Method("stun", stun.stun_select, "nothing",
               "STUN: router-behaviour clustering of experts, one kept per cluster (Lee et al. 2024)",
               stats_options=("stun_coactivation_weight",)),
    ]
    return {m.name: m for m in methods}


METHODS: dict[str, Method] = _registry()
