"""Super-expert candidates (Su et al., 2025, "Unveiling Super Experts in Mixture-of-Experts
Large Language Models", Sec. 3, the profiling rule).

Super experts are the few experts whose down_proj *output* shows extreme activation outliers
(they create the massive activations of the residual stream). The paper profiles, for every
expert of every MoE layer, the maximum |activation| of its down_proj output over the
calibration tokens, A = {a_{l,e}}, and marks (l, e) as a super expert when

    a_{l,e} > P_q(A)   and   a_{l,e} > max(A) / ratio       (q = 99.5, ratio = 10)

i.e. it sits in the extreme tail of the model-wide distribution *and* is within an order of
magnitude of the largest outlier. A is taken over all MoE layers of the model together; the
down_proj input maxima (``super_in_max``) are reported alongside but do not enter the rule.
With few experts in the model (< 200) the percentile lies between the two largest values, so
at most the single largest expert qualifies; that is the rule, not a bug.

Caveat: the paper and its profiling tool could not be consulted offline; the two thresholds
are the paper's rule as we know it and are parameters here. Callers needing another rule can
recompute masks from the stored ``super_out_max`` with :func:`super_expert_mask`.
"""

from __future__ import annotations

import torch


def super_expert_mask(out_max: dict[int, torch.Tensor], percentile: float = 99.5,
                      ratio: float = 10.0) -> dict[int, torch.Tensor]:
    """Per MoE layer a bool [E] mask of super-expert candidates from ``super_out_max``."""
    if not out_max:
        return {}
    layers = sorted(out_max)
    allv = torch.cat([out_max[li].double().reshape(-1) for li in layers])
    if allv.numel() == 0 or float(allv.max()) <= 0:
        return {li: torch.zeros_like(out_max[li], dtype=torch.bool) for li in layers}
    thr = max(float(torch.quantile(allv, percentile / 100.0)), float(allv.max()) / ratio)
    return {li: out_max[li].double() > thr for li in layers}
