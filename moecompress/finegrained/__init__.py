"""Fine-grained pruning inside experts: HEAPr atomic experts, MoE-Pruner / Wanda / magnitude
(unstructured or N:M), and STUN (expert pruning, then unstructured)."""

from .heapr import heapr_prune, heapr_scores
from .unstructured import METHODS as UNSTRUCTURED_METHODS
from .unstructured import unstructured_prune

__all__ = ["heapr_prune", "heapr_scores", "unstructured_prune", "UNSTRUCTURED_METHODS"]
