"""Expert pruning: remove whole experts from every MoE layer (``moecompress prune``).

``prune_checkpoint(src, out, keep=24, method="naee", calib="calib.txt")`` is the one-liner;
``select_experts`` / ``prune_experts`` work on a loaded model. Methods are listed in
:data:`METHODS` (:mod:`.methods`).
"""

from .api import DEFAULT_METHOD, PruneResult, plan_pruning, prune_experts, resolve_keep, select_experts
from .checkpoint import prune_checkpoint
from .methods import METHODS, Method
from .selection import Plan, Selection

__all__ = ["DEFAULT_METHOD", "METHODS", "Method", "Plan", "PruneResult", "Selection", "plan_pruning",
           "prune_checkpoint", "prune_experts", "resolve_keep", "select_experts"]
