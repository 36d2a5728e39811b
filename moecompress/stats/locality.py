"""Local routing consistency: SRP and SCH (Liang et al., 2025, "Not All Models Suit Expert
Offloading: On Local Routing Consistency of Mixture-of-Expert Models"), following the
definitions of the authors' code (github.com/ljcleo/moe-lrc, ``30_srp_calc`` / ``41_sch_calc``).

Both are computed per MoE layer over windows of ``m`` consecutive tokens inside each
calibration sequence (windows never cross sequences).

**SRP - segment routing best performance.** For every window (all start positions, sliding
by one token) let c_e be the number of its tokens routed to expert e. Serving the whole window
with the fixed expert group G_c = {e : c_e >= c} matches sum_{e in G_c} c_e of the window's
m*k routed (token, expert) pairs while predicting |G_c| * m pairs. With the threshold c shared
by all windows, SRP = max_c F1(c) = max_c 2 * M(c) / (P(c) + A), M, P and A summed over all
windows. Computed from a histogram of c_e, so it is exact and fully batched.

**SCH - segment cache best hit rate.** A cache holding C experts serves the tokens of a
sequence in order. A token's experts hit if they are cached when the token arrives; a miss
loads the expert and, once the cache is full, evicts the cached expert with the lowest
priority = (number of uses in the next m tokens, then most recent use), i.e. the cache sees
m tokens into the future. As in the authors' code, loading into a not-yet-full cache counts
as a hit (cold start is free). SCH(C) = hits / (tokens * k), reported for several cache sizes
C >= k (default k, 2k, 4k, capped at E). The simulation is sequential in token position by
nature; it runs once at the end, vectorised over every layer, sequence and cache size.
"""

from __future__ import annotations

import torch


def srp_histogram(seqs: torch.Tensor, num_experts: int, m: int) -> tuple[torch.Tensor, int]:
    """Histogram over c = 0..m of per-(window, expert) hit counts; seqs [B, S, k] top-k ids."""
    B, S, _ = seqs.shape
    if S < m:
        return torch.zeros(m + 1, dtype=torch.int64, device=seqs.device), 0
    hit = torch.zeros(B, S, num_experts, dtype=torch.int32, device=seqs.device)
    hit.scatter_(2, seqs, 1)
    cs = torch.nn.functional.pad(hit.cumsum(1, dtype=torch.int32), (0, 0, 1, 0))
    win = cs[:, m:] - cs[:, :-m]  # [B, S - m + 1, E]
    return torch.bincount(win.reshape(-1).long(), minlength=m + 1), B * (S - m + 1)


def srp_from_histogram(hist: torch.Tensor, windows: int, m: int, k: int) -> torch.Tensor:
    if windows == 0:
        return torch.tensor(float("nan"))
    c = torch.arange(m + 1, dtype=torch.float64)
    n = hist.double()
    matches = (c * n).flip(0).cumsum(0).flip(0)  # M(c) = sum_{c' >= c} c' n(c')
    preds = n.flip(0).cumsum(0).flip(0) * m  # P(c) = m * #{c_e >= c}
    acts = windows * m * k
    return (2 * matches / (preds + acts)).max().float()


def default_cache_sizes(k: int, num_experts: int) -> tuple[int, ...]:
    return tuple(sorted({min(c, num_experts) for c in (k, 2 * k, 4 * k)}))


class SCHBuffer:
    """Keeps every layer's top-k ids (CPU, small ints) until :meth:`finalize`."""

    def __init__(self):
        self.seqs: dict[int, list[torch.Tensor]] = {}
        self.num_experts: dict[int, int] = {}

    def add(self, layer_idx: int, seqs: torch.Tensor, num_experts: int) -> None:
        small = torch.int16 if num_experts < 2**15 else torch.int32
        self.seqs.setdefault(layer_idx, []).append(seqs.to("cpu", small))
        self.num_experts[layer_idx] = num_experts

    def finalize(self, m: int, cache_sizes: tuple[int, ...] | None) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        # group layers of equal shape so one simulation serves them all
        groups: dict[tuple, list[int]] = {}
        for li, parts in sorted(self.seqs.items()):
            s = torch.cat(parts)
            groups.setdefault((tuple(s.shape), self.num_experts[li]), []).append(li)
        for (shape, E), layers in groups.items():
            k = shape[2]
            sizes = tuple(sorted({min(max(c, k), E) for c in cache_sizes})) if cache_sizes else default_cache_sizes(k, E)
            stacked = torch.stack([torch.cat(self.seqs[li]).long() for li in layers])  # [L, N, S, k]
            rates = simulate_cache(stacked, E, m, sizes)  # [L, nC]
            for i, li in enumerate(layers):
                out[li] = rates[i]
        self.seqs.clear()
        return out


@torch.no_grad()
def simulate_cache(seqs: torch.Tensor, num_experts: int, m: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Hit rate [L, len(sizes)] of the m-token-lookahead cache for seqs [L, N, S, k]."""
    L, N, S, k = seqs.shape
    E, R, nC = num_experts, L * N, len(sizes)
    seqs = seqs.reshape(R, S, k)
    C = torch.tensor(sizes, dtype=torch.long)
    rows = torch.arange(R)[:, None]

    def onehot(t: int) -> torch.Tensor:
        h = torch.zeros(R, E, dtype=torch.long)
        return h.scatter_(1, seqs[:, t], 1)

    cached = torch.zeros(R, nC, E, dtype=torch.bool)
    seen = torch.zeros(R, E, dtype=torch.bool)
    n_seen = torch.zeros(R, dtype=torch.long)
    last_use = torch.full((R, E), -1, dtype=torch.long)
    window = sum((onehot(t) for t in range(min(m, S))), torch.zeros(R, E, dtype=torch.long))  # uses in [0, m)
    tie = torch.arange(E - 1, -1, -1)  # deterministic tie-break: lower expert index wins
    hits = torch.zeros(R, nC, dtype=torch.long)
    big = torch.iinfo(torch.long).max
    for t in range(S):
        ids = seqs[:, t]  # [R, k]
        now = torch.zeros(R, E, dtype=torch.bool)
        now[rows, ids] = True
        hits += (cached & now[:, None, :]).sum(-1)
        # first uses fill free slots for free (order of the top-k list within the token)
        new = ~seen.gather(1, ids)  # [R, k]
        order = n_seen[:, None] + new.long().cumsum(1) - new.long()
        hits += (new[:, :, None] & (order[:, :, None] < C[None, None, :]) & ~cached.gather(2, ids[:, None, :].expand(R, nC, k)).transpose(1, 2)).sum(1)
        seen |= now
        n_seen += new.sum(1)
        last_use[now] = t
        # window -> uses in (t, t + m]
        window -= now.long()
        if t + m < S:
            window += onehot(t + m)
        prio = (window * (S + 1) + (last_use + 1)) * E + tie
        prio = torch.where(now, torch.full_like(prio, big), prio)
        cand = cached | now[:, None, :]
        score = torch.where(cand, prio[:, None, :], torch.full_like(cand, -1, dtype=torch.long))
        kth = score.sort(dim=-1, descending=True).values.gather(2, (C - 1).expand(R, nC)[:, :, None])
        cached = cand & (score >= kth)
    return (hits.reshape(L, N, nC).sum(1).double() / (N * S * k)).float()
