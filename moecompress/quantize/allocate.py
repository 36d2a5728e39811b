"""Bit-width allocation: MC-MoE's pre-loading mixed precision as an integer program.

Huang et al., "Mixture Compressor for Mixture-of-Experts LLMs Gains More" (MC-MoE, ICLR 2025),
Sec. 3.1, Eq. 4-6: for the experts i of an MoE layer and candidate widths b, with the activation
frequency phi_i (top-k hits) and activation weight w_i (routing probability before the top-k
renormalisation, summed over tokens), each normalised within the layer, and the quantization
loss eps_{i,b} = ||Z - Z^_{i,b}||_F of the layer output when only expert i is quantized at b bits,

    minimise   sum_{i,b} x_{i,b} * phi_i^alpha * w_i^beta * eps_{i,b}
    subject to sum_b x_{i,b} = 1 (one width per expert),  sum_{i,b} x_{i,b} * cost_{i,b} <= budget,
               x_{i,b} in {0, 1}

with alpha = 1, beta = 1.5 (the authors' defaults). The authors solve it with Gurobi
(``precision_solver.py``); here ``scipy.optimize.milp`` (HiGHS). ``cost_{i,b}`` is counted
honestly: weights plus scales plus zero points (``grid.matrix_bits``).

That objective, faithfully, is ``--allocation mc-moe-paper``. The default ``mc-moe`` keeps the
integer program and the measured loss but minimises ``sum_{i,b} x_{i,b} eps_{i,b}^2`` (see
:func:`allocation_cost` for why; docs/benchmarks.md, "Quantization", for the measurements).

Granularity (a deployment fact: no engine serves several widths inside one MoE layer):
``expert`` solves one program per layer as published; ``layer`` lifts it to one width per MoE
layer over the whole model, a layer's cost at b being the sum of its experts' weighted losses,
its size the sum of their bits, under one model-wide budget.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..errors import MoECompressError


def solve(cost: np.ndarray, size: np.ndarray, budget: float) -> list[int]:
    """The choice j_i (index into the candidates) per item i minimising sum cost[i, j_i] subject
    to sum size[i, j_i] <= budget; ``cost``/``size`` are [items, candidates]."""
    n, m = cost.shape
    if float(size.min(axis=1).sum()) > budget * (1 + 1e-12):
        raise MoECompressError(f"the bit budget cannot be met even with the smallest candidate width "
                               f"everywhere; raise --bits or add a smaller width to --candidates")
    # Scale the objective: the losses can be tiny and HiGHS' tolerances are absolute.
    c = cost.reshape(-1) / max(float(np.abs(cost).max()), 1e-300)
    one_each = np.kron(np.eye(n), np.ones((1, m)))
    budget_row = size.reshape(1, -1)
    res = milp(c, integrality=np.ones(n * m), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(budget_row, -np.inf, budget)],
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise MoECompressError(f"the allocation's integer program has no solution ({res.message})")
    x = res.x.reshape(n, m)
    return [int(np.argmax(row)) for row in x]


def brute_force(cost: np.ndarray, size: np.ndarray, budget: float) -> list[int]:
    """Reference for :func:`solve` on small cases: every assignment."""
    best = None
    for choice in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        s = sum(size[i, j] for i, j in enumerate(choice))
        if s <= budget * (1 + 1e-12):
            v = sum(cost[i, j] for i, j in enumerate(choice))
            if best is None or v < best[0] - 1e-12:
                best = (v, list(choice))
    if best is None:
        raise MoECompressError("no assignment meets the budget")
    return best[1]


def importance(freq: np.ndarray, weight: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """phi^alpha * w^beta with both normalised to sum 1 within the layer (MC-MoE Eq. 5)."""
    f = freq / freq.sum() if freq.sum() > 0 else np.full_like(freq, 1 / len(freq))
    w = weight / weight.sum() if weight.sum() > 0 else np.full_like(weight, 1 / len(weight))
    return f ** alpha * w ** beta


def allocation_cost(method: str, eps: np.ndarray, freq: np.ndarray, weight: np.ndarray, alpha: float,
                    beta: float) -> np.ndarray:
    """[experts, candidates] objective of one layer for ``method`` (``eps``: the measured
    ``||Z - Z^_{i,b}||_F``, see ``experts.output_loss``):

    * ``mc-moe`` (the default): ``eps_{i,b}^2``, the expert's squared contribution to the layer's
      output error on the calibration tokens routed to it, each token's error scaled by its routing
      weight. Summed over experts it is the first-order estimate of ``||Z - Z^||_F^2`` with every
      expert quantized at once, the quantity GPTQ minimises per matrix. Frequency and routing weight
      are in it already (one term per routed token, each scaled by its weight), so no importance
      factor multiplies it. Not the paper's weighting: the published objective below counts them
      twice more and, measured on the testbed, sends the rare experts to the smallest width too
      eagerly (docs/benchmarks.md, "Quantization");
    * ``mc-moe-paper``: ``phi^alpha w^beta eps_{i,b}`` (MC-MoE Eq. 5-6 and the authors'
      ``precision_solver.py``), the published objective, faithfully;
    * ``frequency`` (the paper's frequency-only ablation): phi_i times the layer's mean loss at b,
      so only how often an expert is used, not how much its quantization hurts, decides.
    """
    if method == "mc-moe":
        return eps ** 2
    if method == "mc-moe-paper":
        return importance(freq, weight, alpha, beta)[:, None] * eps
    if method == "frequency":
        return importance(freq, weight, 1.0, 0.0)[:, None] * eps.mean(axis=0, keepdims=True)
    raise ValueError(method)


def random_allocation(sizes: np.ndarray, budget: float, seed: int) -> list[int]:
    """A seeded random assignment that uses the budget as fully as the uniform one (baseline):
    random widths, then random single-item changes towards the budget while it still fits."""
    rng = np.random.default_rng(seed)
    n, m = sizes.shape
    choice = rng.integers(0, m, size=n)
    total = lambda ch: float(sizes[np.arange(n), ch].sum())  # noqa: E731
    for _ in range(50 * n * m):  # move down until it fits
        if total(choice) <= budget:
            break
        i = rng.integers(n)
        if choice[i] > 0:
            choice[i] -= 1
    for _ in range(50 * n * m):  # then up while it fits
        i = rng.integers(n)
        if choice[i] + 1 < m:
            choice[i] += 1
            if total(choice) > budget:
                choice[i] -= 1
    return [int(c) for c in choice]
