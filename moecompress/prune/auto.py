"""``auto``: the robust default, one rule choosing between two measured methods per case.

Rule (docs/benchmarks.md, "Repair after removal"): NAEE when the kept count is larger than the
routed top-k, frequency (top-k hit count) when it is not. With kept <= top-k every token uses
every kept expert, so there is no routing left for NAEE's reconstruction search to choose well:
the set that best reconstructs the layer on mixed text is not the one each domain needs (mixtral
at 2 of 8: NAEE code perplexity 420.90 vs frequency 84.47), while the experts routed most often
serve the most tokens of every domain.
"""

from __future__ import annotations

from .naee import naee_select
from .scores import stat_selector
from .selection import Plan, Selection


def auto_rule(keep: int, top_k: int) -> str:
    """The method ``auto`` runs for ``keep`` kept experts of a layer routing ``top_k``."""
    return "naee" if keep > top_k else "frequency"


def auto_select(sel: Selection) -> Plan:
    """Robust default: NAEE when the kept count exceeds the routed top-k, else frequency."""
    chosen = auto_rule(sel.keep, sel.view.layers[0].top_k)
    if chosen == "naee":
        plan = naee_select(sel)
    else:
        if sel.stats is None:
            from ..stats import collect_stats

            sel.stats = collect_stats(sel.model, sel.tokens, batch_size=sel.batch_size, progress=sel.progress)
        plan = stat_selector("count")(sel)
    plan.info["auto"] = {"method": chosen, "rule": "naee when kept > top-k, else frequency"}
    return plan
