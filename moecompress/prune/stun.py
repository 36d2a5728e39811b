"""STUN's expert-pruning stage: cluster experts by behaviour similarity, keep one per cluster.

Lee et al., "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning" (ACL 2025,
arXiv:2409.06211), Sec. 4 (the O(1) expert pruning; issue 5 adds the unstructured stage):

1. Behaviour similarity of experts i, j from the router (no forward pass needed): the
   distance of their router rows, ||W_i - W_j|| / ||W||_F; when co-activation statistics
   are available (``--calib`` / ``--stats``), experts that fire together behave alike, so
   the distance is lowered by lambda * a_ij / mean(a), a_ij = tokens routed to both
   (``stun_coactivation_weight`` = lambda, the authors' ``mix_weight``). The default is 0,
   the router-only O(1) method: on the testbed co-activation mostly measures how often
   experts are used, so mixing it in clusters the busiest experts together and removes them
   (docs/benchmarks.md).
2. Greedy clustering (the authors' ``greedy_but_reject_mixed``): visit expert pairs from the
   closest and join their clusters unless that would put two experts farther apart than a
   threshold tau in one cluster; tau is the smallest value (binary search, as the authors
   search theirs) for which the merging reaches ``keep`` clusters.
3. Each cluster keeps the expert whose weights are closest to the cluster's mean weights
   (the authors' representative choice); singletons keep themselves.

Protected experts (``--protect-super-experts``) are never joined with each other and always
represent their cluster.
"""

from __future__ import annotations

import torch

from ..arch import MoELayer
from ..errors import MoECompressError
from ..onload import onloaded
from .selection import Plan, Selection

DEFAULTS = {"stun_coactivation_weight": 0.0}


def behaviour_distance(layer: MoELayer, coactivation: torch.Tensor | None, weight: float) -> torch.Tensor:
    """[E, E] distance: router-row distance normalised by the router norm, minus
    ``weight`` * co-activation / mean off-diagonal co-activation."""
    W = layer.router_weight.detach().double().cpu()
    d = torch.cdist(W, W) / W.norm().clamp_min(1e-30)
    if coactivation is not None and weight:
        a = coactivation.double().cpu().clone()
        a.fill_diagonal_(0)
        E = a.shape[0]
        mean = a.sum() / max(E * (E - 1), 1)
        if mean > 0:
            d = d - weight * a / mean
    return d


def greedy_clusters(dist: torch.Tensor, n_clusters: int, protected: set[int] = frozenset(),
                    threshold: float = float("inf")) -> list[list[int]]:
    """The authors' greedy merge: visit expert pairs from the closest (ties by index) and join
    their clusters unless some pair across the two clusters is farther than ``threshold``
    (their "reject mixed" rule) or both clusters hold a protected expert; stop at
    ``n_clusters`` clusters."""
    E = dist.shape[0]
    members = {e: [e] for e in range(E)}  # cluster id (its smallest member) -> members
    where = list(range(E))
    pairs = sorted((float(dist[i, j]), i, j) for i in range(E) for j in range(i + 1, E))
    for _, i, j in pairs:
        if len(members) <= n_clusters:
            break
        a, b = where[i], where[j]
        if a == b:
            continue
        if any(e in protected for e in members[a]) and any(e in protected for e in members[b]):
            continue
        if threshold != float("inf") and float(dist[members[a]][:, members[b]].max()) > threshold:
            continue
        a, b = min(a, b), max(a, b)
        for e in members[b]:
            where[e] = a
        members[a] = sorted(members[a] + members.pop(b))
    return sorted(members.values())


def threshold_clusters(dist: torch.Tensor, n_clusters: int, protected: set[int] = frozenset()) -> list[list[int]]:
    """Greedy clusters under the smallest rejection threshold that still reaches
    ``n_clusters`` (the authors binary-search their threshold for the target expert count);
    a low threshold keeps clusters tight instead of chaining far experts together."""
    E = dist.shape[0]
    candidates = sorted({float(dist[i, j]) for i in range(E) for j in range(i + 1, E)})
    lo, hi = 0, len(candidates) - 1
    best = greedy_clusters(dist, n_clusters, protected, candidates[hi])
    while lo <= hi:
        mid = (lo + hi) // 2
        got = greedy_clusters(dist, n_clusters, protected, candidates[mid])
        if len(got) <= n_clusters:
            best, hi = got, mid - 1
        else:
            lo = mid + 1
    if len(best) > n_clusters:  # rejection blocked every threshold: plain greedy merge
        best = greedy_clusters(dist, n_clusters, protected)
    return best


@torch.no_grad()
def representative(layer: MoELayer, members: list[int], protected: set[int] = frozenset()) -> int:
    """The member whose flattened (gate, up, down) weights are closest to the members' mean."""
    chosen = [e for e in members if e in protected]
    if chosen:
        return chosen[0]
    if len(members) == 1:
        return members[0]
    flat = torch.stack([torch.cat([layer.gate_proj[e].reshape(-1), layer.up_proj[e].reshape(-1),
                                   layer.down_proj[e].reshape(-1)]).double() for e in members])
    dist = (flat - flat.mean(0)).norm(dim=1)
    return members[int(torch.argmin(dist))]


def stun_select(sel: Selection) -> Plan:
    """STUN expert pruning (Lee et al. 2024, Sec. 4): behaviour-similarity clustering with
    greedy decisions, one representative kept per cluster (see the module docstring)."""
    weight = float(sel.options.get("stun_coactivation_weight", DEFAULTS["stun_coactivation_weight"]))
    if weight and sel.stats is None:
        raise MoECompressError("stun_coactivation_weight > 0 needs co-activation statistics; pass --calib FILE or --stats FILE")
    kept, info = {}, {"layers": {}, "coactivation_weight": weight if sel.stats is not None else 0.0}
    for layer in sel.view:
        li = layer.layer_idx
        coact = sel.stats.get(li, "coactivation") if weight else None
        protected = sel.protected.get(li, set())
        with onloaded(layer.block):  # a streamed layer's router and expert weights
            dist = behaviour_distance(layer, coact, weight)
            clusters = []  # grouped routing: each group is clustered into keep / groups clusters on its own
            for group in sel.group_of(layer.num_experts):
                idx = list(group)
                local = threshold_clusters(dist[idx][:, idx], sel.keep // sel.groups,
                                           {idx.index(e) for e in protected if e in group})
                clusters += [[idx[i] for i in c] for c in local]
            clusters.sort()
            kept[li] = sorted(representative(layer, c, protected) for c in clusters)
        info["layers"][li] = {"clusters": [c for c in clusters if len(c) > 1]}
    return Plan(kept=kept, info=info)
