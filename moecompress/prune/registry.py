"""Every pruning method in one registry, with what it removes (its kind).

* ``experts`` — whole experts of every MoE layer (``prune/methods.py``: a selection rule);
* ``neurons`` — intermediate neurons inside each expert (HEAPr's atomic experts);
* ``weights`` — single weights, unstructured or N:M (MoE-Pruner, Wanda, magnitude; STUN's
  experts-then-weights pipeline).

``moecompress prune --method NAME`` and a recipe's ``prune: {method: NAME}`` look the name up
here; ``moecompress ls methods`` prints this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Kind = Literal["experts", "neurons", "weights"]
# What a method needs besides the model: nothing, routing statistics, or calibration tokens.
Needs = Literal["nothing", "stats", "tokens"]


@dataclass(frozen=True)
class PruneMethod:
    name: str
    kind: Kind
    needs: Needs
    summary: str  # one line: what it does, and the paper


_FINE_GRAINED = (
    PruneMethod("heapr", "neurons", "tokens", "HEAPr: atomic experts (neurons) ranked by second-order output-space "
                "importance; --ratio of each expert's neurons removed (Li et al. 2026)"),
    PruneMethod("moe-pruner", "weights", "tokens", "MoE-Pruner: |W| x router-weighted input norm, unstructured or "
                "N:M (Xie et al. 2024, Eq. 9)"),
    PruneMethod("wanda", "weights", "tokens", "Wanda: |W| x input norm per routed token, unstructured or N:M "
                "(Sun et al. 2023)"),
    PruneMethod("magnitude", "weights", "nothing", "|W|, unstructured or N:M (baseline)"),
    PruneMethod("stun-unstructured", "weights", "tokens", "STUN: whole experts (stun) then Wanda inside the rest; "
                "also `stun` with --sparsity/--nm (Lee et al. 2024)"),
)


@lru_cache(maxsize=None)
def registry() -> dict[str, PruneMethod]:
    from .methods import METHODS

    out = {m.name: PruneMethod(m.name, "experts", m.needs, m.summary) for m in METHODS.values()}
    out.update({m.name: m for m in _FINE_GRAINED})
    return out


def method_names() -> list[str]:
    return list(registry())


def effective_method(method: str, sparsity: float | None, nm: str | None) -> str:
    """``stun`` given a weight budget (--sparsity/--nm) is the full STUN pipeline."""
    return "stun-unstructured" if method == "stun" and (sparsity is not None or nm is not None) else method
