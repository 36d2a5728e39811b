"""Expert merging: reduce every MoE layer to fewer experts by merging, not dropping (``moecompress merge``).

``merge_checkpoint(src, out, keep=16, method="m-smoe", calib="calib.txt")`` is the one-liner;
:func:`merge_experts` works on a loaded model. Methods: :data:`METHODS` (M-SMoE, HC-SMoE,
plain averaging); clustering in :mod:`.cluster`, neuron alignment in :mod:`.align`, weighted
averaging in :mod:`.combine`, the least-squares re-fit in :mod:`.refit`.
"""

from .api import (DEFAULT_METHOD, DEFAULT_RIDGE, METHODS, ROUTER_RULES, MergePlan, MergeResult,
                  merge_experts, plan_merge)
from .checkpoint import merge_checkpoint

__all__ = ["DEFAULT_METHOD", "DEFAULT_RIDGE", "METHODS", "ROUTER_RULES", "MergePlan", "MergeResult",
           "merge_checkpoint", "merge_experts", "plan_merge"]
