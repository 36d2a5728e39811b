"""Permutation alignment of expert neurons before merging (M-SMoE, Li et al. ICLR 2024, Sec. 3.3).

An expert's intermediate neurons can be listed in any order without changing its function
(permute the rows of gate/up and the columns of down together). Before two experts are
averaged, M-SMoE permutes the non-dominant expert's neurons to best match the dominant one
("weight matching", Ainsworth et al., Git Re-Basin, 2023): the permutation maximises
``sum_a <w_ref[a], w_other[perm[a]]>`` where ``w[a]`` concatenates neuron ``a``'s gate row,
up row, down column (and biases). This is a linear assignment problem, solved exactly by
``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from scipy.optimize import linear_sum_assignment

from .combine import ExpertWeights


def neuron_features(w: ExpertWeights) -> torch.Tensor:
    """[I, D] per-neuron weight vectors (gate row, up row, down column, gate/up biases)."""
    parts = [w.gate, w.up, w.down.T]
    parts += [b[:, None] for b in (w.gate_bias, w.up_bias) if b is not None]
    return torch.cat([p.double() for p in parts], dim=1)


def match_neurons(ref: ExpertWeights, other: ExpertWeights) -> torch.Tensor:
    """``perm`` [I] such that ``other.permuted(perm)`` has its neurons in ``ref``'s order."""
    return _assignment(_similarity(ref, other))


def _similarity(ref: ExpertWeights, other: ExpertWeights):
    """[I_ref, I_other] neuron similarity, computed where the weights are, returned on the CPU."""
    return (neuron_features(ref) @ neuron_features(other).T).cpu().numpy()


def _assignment(similarity) -> torch.Tensor:
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    perm = torch.empty(similarity.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def member_permutations(layer, clusters: list[list[int]], dominant: list[int]) -> dict[int, torch.Tensor]:
    """:func:`match_neurons` of every non-dominant member of every cluster of ``layer`` to its
    cluster's dominant expert: ``{expert: perm}``.

    The similarity matrices are computed one at a time where the weights are (the GPU holds
    one problem's features at a time: solving while computing on 16 threads took a streamed
    merge 0.33 GiB over its 4 GiB cap). The assignment problems are then solved on
    ``torch.get_num_threads()`` threads: scipy's solver releases the GIL (2 threads: 1.9x on
    1024 x 1024 problems, of which one OLMoE-shaped layer has 32, 62 ms each serially). Each
    permutation is the serial one: only the order of solving changes.
    """
    pairs = [(dom, e) for members, dom in zip(clusters, dominant) for e in members if e != dom]
    if not pairs:
        return {}
    similarities = [_similarity(ExpertWeights.read(layer, dom), ExpertWeights.read(layer, e)) for dom, e in pairs]
    with ThreadPoolExecutor(max_workers=max(1, min(len(pairs), torch.get_num_threads()))) as pool:
        perms = list(pool.map(_assignment, similarities))
    return {e: perm for (_, e), perm in zip(pairs, perms)}
