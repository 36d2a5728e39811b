"""SCH cache simulation as one Triton kernel (GPU): one program per (sequence row, cache size).

The simulation is sequential in token position; in torch it costs ~25 kernel launches per
position (0.2-0.4 s for 512 positions, more than a forward pass of a small model). Here each
program walks its sequence with the state (cached / seen / last use / look-ahead window) in
registers. Semantics are exactly those of :func:`moecompress.stats.locality.simulate_cache`;
``locality`` falls back to torch when Triton is missing or the kernel fails.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _members(ids_ptr, base, offs, K: tl.constexpr):
    now = offs < 0
    for j in tl.static_range(K):
        e = tl.load(ids_ptr + base + j)
        now = now | (offs == e)
    return now


@triton.jit
def _sch_kernel(ids_ptr, sizes_ptr, hits_ptr, S, M, M0, E, n_sizes, K: tl.constexpr, BLOCK_E: tl.constexpr):
    r = tl.program_id(0)
    ci = tl.program_id(1)
    C = tl.load(sizes_ptr + ci).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    row = r.to(tl.int64) * S * K
    big = 9223372036854775807
    cached = offs < 0
    seen = offs < 0
    last_use = tl.full([BLOCK_E], -1, tl.int64)
    window = tl.zeros([BLOCK_E], tl.int64)
    for t in range(0, M0):  # M0 = min(M, S): the first look-ahead window
        window += _members(ids_ptr, row + t * K, offs, K).to(tl.int64)
    tie = (E - 1 - offs).to(tl.int64)
    hits = tl.zeros([1], tl.int64).sum(axis=0)
    n_seen = tl.zeros([1], tl.int64).sum(axis=0)
    for t in range(0, S):
        now = _members(ids_ptr, row + t * K, offs, K)
        hits += tl.sum((cached & now).to(tl.int64), axis=0)
        n_new = tl.sum((now & ~seen).to(tl.int64), axis=0)
        hits += tl.minimum(n_new, tl.maximum(C - n_seen, 0))
        seen = seen | now
        n_seen += n_new
        last_use = tl.where(now, t.to(tl.int64), last_use)
        window -= now.to(tl.int64)
        if t + M < S:
            window += _members(ids_ptr, row + (t + M) * K, offs, K).to(tl.int64)
        prio = (window * (S + 1) + (last_use + 1)) * E + tie
        cand = cached | now
        evict = tl.sum(cand.to(tl.int64), axis=0) - C
        while evict > 0:  # drop the lowest-priority cached expert not used by this token
            lowest = tl.min(tl.where(cand & ~now, prio, big), axis=0)
            cand = cand & ~(prio == lowest)
            evict -= 1
        cached = cand
    tl.store(hits_ptr + r * n_sizes + ci, hits)


def simulate_cache_triton(seqs: torch.Tensor, num_experts: int, m: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Hit rate [L, len(sizes)] for seqs [L, N, S, k] on a CUDA device."""
    L, N, S, k = seqs.shape
    ids = seqs.reshape(L * N, S, k).to(torch.int64).contiguous()
    sz = torch.tensor(sizes, dtype=torch.int64, device=seqs.device)
    hits = torch.zeros(L * N, len(sizes), dtype=torch.int64, device=seqs.device)
    block = triton.next_power_of_2(max(num_experts, 16))
    _sch_kernel[(L * N, len(sizes))](ids, sz, hits, S, m, min(m, S), num_experts, len(sizes), K=k, BLOCK_E=block)
    return (hits.reshape(L, N, len(sizes)).sum(1).double() / (N * S * k)).float().cpu()
