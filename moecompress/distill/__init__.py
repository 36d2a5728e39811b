"""Knowledge distillation of a compressed student from its teacher (``moecompress distill``).

* :func:`distill_checkpoint` — the library entry (options: ``moecompress.options.DistillOptions``);
* :mod:`.losses` — KL (optionally over the teacher's top-K logits) and hidden-state MSE;
* :mod:`.data` — training sequences and their seeded, resumable order;
* :mod:`.trainer` — the loop on accelerate (mixed precision, accumulation, checkpoints, resume);
* :mod:`.stages` — SlimMoE's staged slimming schedule;
* :mod:`.expertwise` — MoE-Pruner's expert-wise (layer-by-layer) distillation.
"""

from .api import DistillResult, distill_checkpoint
from ..options import DistillOptions
from .stages import Stage, parse_stages

__all__ = ["DistillOptions", "DistillResult", "Stage", "distill_checkpoint", "parse_stages"]
