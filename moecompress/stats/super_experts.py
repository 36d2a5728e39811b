"""Super-expert candidates (Su et al., 2025, "Unveiling Super Experts in Mixture-of-Experts
Large Language Models", arXiv 2507.23279, the profiling rule).

Super experts are the few experts whose down_proj *output* shows extreme activation outliers
(they create the massive activations of the residual stream). Every expert of every MoE layer
is profiled by the maximum |activation| of its down_proj output over the calibration tokens,
A = {a_{l,e}}, and (l, e) is marked when

    a_{l,e} > P_99.5(A)   and   a_{l,e} > max(A) / 10

(strict inequalities, A pooled over all MoE layers of the model, percentile with linear
interpolation). Sources read for this audit: the REAP authors' implementation of this rule
(CerebrasResearch/reap, src/reap/model_util.py ``get_super_expert_indices``: quantile 99.5 and
``max / times`` with times = 10 over the concatenated per-layer maxima, ``>``) and a summary of
the paper (hustzxd/EfficientPaper, notes/2025/Super-Experts-Profilling/note.md), which also
states the activation (down_proj output) and the two thresholds. Both agree with this rule.

Not applied here: the paper's third condition, l in L (the layers where the massive
activations arise), which cannot be derived from the per-expert maxima; REAP approximates it by
keeping only the first 75 % of the layers. This mask is therefore a *candidate* set that may
include the "outlier experts" of the last layers. The paper text and the authors' profiling
tool (ZunhaiSu/Super-Experts-Profilling) are not in the stored corpora. The down_proj input
maxima (``super_in_max``) are reported alongside but do not enter the rule. With few experts in
the model (< 200) the percentile lies between the two largest values, so at most the single
largest expert qualifies; that is the rule, not a bug. Callers needing another rule can
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
