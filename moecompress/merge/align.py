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
    cost = neuron_features(ref) @ neuron_features(other).T  # [I_ref, I_other] similarity
    rows, cols = linear_sum_assignment(cost.cpu().numpy(), maximize=True)
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm
