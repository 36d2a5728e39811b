"""Which experts of a layer are merged together.

* :func:`hierarchical_clusters` — HC-SMoE (Chen et al., "Retraining-Free Merging of Sparse
  MoE via Hierarchical Clustering", ICML 2025, Sec. 3.2): agglomerative clustering of the
  experts' *average outputs* over the calibration tokens, cut at ``n`` clusters. scipy's
  ``linkage`` builds the tree (single / complete / average / ward linkage, Euclidean distance
  as in the paper, or cosine).
* :func:`dominant_groups` — M-SMoE (Li et al., "Merge, Then Compress: Demystify Efficient SMoE
  with Hints from Its Routing Policy", ICLR 2024, Sec. 3.2): the ``n`` most frequently routed
  experts are *dominant*; every other expert joins the dominant expert whose router logits
  over the calibration tokens are most similar (cosine similarity of the logit columns).

Both return clusters as sorted lists of expert indices; :func:`dominant_member` names the
member whose router row the merged expert keeps.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage as scipy_linkage

from ..errors import MoECompressError

LINKAGES = ("average", "single", "complete", "ward")
METRICS = ("euclidean", "cosine")


def check_clustering(linkage: str, metric: str) -> None:
    """The linkage / distance pairs scipy's hierarchical clustering accepts."""
    if linkage not in LINKAGES:
        raise MoECompressError(f"unknown --linkage '{linkage}'; use one of: {', '.join(LINKAGES)}")
    if metric not in METRICS:
        raise MoECompressError(f"unknown --distance '{metric}'; use one of: {', '.join(METRICS)}")
    if linkage == "ward" and metric != "euclidean":
        raise MoECompressError("ward linkage needs --distance euclidean")


def clusters_from_labels(labels) -> list[list[int]]:
    """Clusters (sorted members) ordered by their smallest member."""
    groups: dict[int, list[int]] = {}
    for e, lab in enumerate(list(labels)):
        groups.setdefault(int(lab), []).append(e)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def hierarchical_clusters(features: torch.Tensor, n_clusters: int, linkage: str = "average",
                          metric: str = "euclidean") -> list[list[int]]:
    """Agglomerative clustering of the rows of ``features`` [E, D] into ``n_clusters`` clusters.

    The tree is cut by replaying its first ``E - n_clusters`` merges (exactly ``n_clusters``
    clusters, even when several merges happen at the same height).
    """
    check_clustering(linkage, metric)
    x = features.detach().double().cpu().numpy()
    num = x.shape[0]
    if not 1 <= n_clusters <= num:
        raise ValueError(f"n_clusters must be between 1 and {num}")
    if n_clusters == num:
        return [[e] for e in range(num)]
    if metric == "cosine":
        # Zero rows have no direction; give them a tiny one so distances stay finite.
        x = x + (np.linalg.norm(x, axis=1, keepdims=True) == 0) * 1e-12
    z = scipy_linkage(x, method=linkage, metric=metric)
    parent = list(range(2 * num - 1))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for step in range(num - n_clusters):
        a, b = int(z[step, 0]), int(z[step, 1])
        parent[root(a)] = num + step
        parent[root(b)] = num + step
    return clusters_from_labels(root(e) for e in range(num))


def logit_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [E, E] of the router-logit columns, from their Gram matrix L^T L."""
    g = gram.double()
    norm = g.diagonal().clamp_min(0).sqrt()
    return torch.nan_to_num(g / (norm[:, None] * norm[None, :]), nan=-1.0)


def top_frequent(freq: torch.Tensor, n: int) -> list[int]:
    """The ``n`` most frequent experts (ties: lower index first), ascending."""
    order = torch.argsort(-freq.double(), stable=True)
    return sorted(order[:n].tolist())


def dominant_groups(freq: torch.Tensor, similarity: torch.Tensor, n_groups: int) -> list[list[int]]:
    """M-SMoE grouping: dominant experts by frequency, the others to the most similar one."""
    num = freq.numel()
    if not 1 <= n_groups <= num:
        raise ValueError(f"n_groups must be between 1 and {num}")
    dominant = top_frequent(freq, n_groups)
    groups = {d: [d] for d in dominant}
    dom = torch.tensor(dominant)
    for e in range(num):
        if e in groups:
            continue
        sims = similarity[e, dom].double()
        best = int(torch.argmax(sims))  # first maximum: the lowest-index dominant on ties
        groups[dominant[best]].append(e)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def dominant_member(cluster: list[int], freq: torch.Tensor) -> int:
    """The most frequently routed member (ties: the lowest index)."""
    return max(cluster, key=lambda e: (float(freq[e]), -e))
