"""Local routing consistency: SRP and SCH (Liang et al., 2025, "Not All Models Suit Expert
Offloading: On Local Routing Consistency of Mixture-of-Expert Models"), following the
definitions of the authors' code (github.com/ljcleo/moe-lrc, src/30_srp_calc.py +
src/31_srp_refine.py for SRP, src/41_sch_calc.py ``calc_fsf`` for SCH), read for this audit.
Only the paper's abstract (arxiv.org/html/2505.16056v3) is in the stored corpora, not its
equations: the definitions below are the code's.

Both are computed per MoE layer over windows of ``m`` consecutive tokens inside each
calibration sequence (windows never cross sequences).

**SRP - segment routing best performance.** For every window (all start positions, sliding
by one token) let c_e be the number of its tokens routed to expert e. Serving the whole window
with the fixed expert group G_c = {e : c_e >= c} matches sum_{e in G_c} c_e of the window's
m*k routed (token, expert) pairs while predicting |G_c| * m pairs. With the threshold c shared
by all windows and experts, SRP = max_c F1(c) = max_c 2 * M(c) / (P(c) + A), M, P and A summed
over all windows and experts: the authors' layer-level SRP (31_srp_refine.py sums the
per-expert m/p/a over experts, then takes the best F1 over c). Computed from a histogram of
c_e, so it is exact and fully batched. Matches the authors' code.

**SCH - segment cache best hit rate.** A cache holding C experts serves the tokens of a
sequence in order. A token's experts hit if they are cached when the token arrives; a miss
loads the expert and, once the cache is full, evicts the cached expert with the lowest
priority = (number of uses in the m-token segment that starts at the current token, i.e. the
next m - 1 tokens, then most recent use). This is the authors' ``calc_fsf(seq, E, future_len=m)``:
its priority counts uses in tokens [i, i + m - 1] (earlier versions here looked at m tokens
*after* the current one, one token too far). As in the authors' code, loading into a
not-yet-full cache counts as a hit (cold start is free). SCH(C) = hits / (tokens * k),
reported for several cache sizes C >= k (default k, 2k, 4k, capped at E).
Remaining deviations from ``calc_fsf`` (edge cases only): the authors update their priority
stack expert by expert inside a token (so an expert of the current token can be pushed out by
a later one of the same token), while here all experts of the current token stay cached; and
equal priorities are broken by lower expert index here, by top-k slot order there.
The simulation is sequential in token position by nature; it runs once at the end on the CPU
(NumPy), vectorised over every layer, sequence and cache size (the kernels take the look-ahead
m - 1 after the current token).
"""

from __future__ import annotations

import numpy as np
import torch


def srp_histograms(hit: torch.Tensor, m: int) -> tuple[torch.Tensor, int]:
    """Per layer, the histogram over c = 0..m of per-(window, expert) hit counts.

    ``hit`` [L, B, S, E] is the 0/1 routing of L layers over B sequences of S tokens; returns
    ([L, m + 1] int64 counts, windows per layer).
    """
    L, B, S, E = hit.shape
    if S < m:
        return torch.zeros(L, m + 1, dtype=torch.int64, device=hit.device), 0
    # prefix sums over positions, in int32, along the last (contiguous) dimension: the fast
    # scan on a GPU (a scan along an outer dimension runs one sequential thread per column)
    cs = torch.nn.functional.pad(hit.transpose(2, 3).contiguous().cumsum(-1, dtype=torch.int32), (1, 0))
    win = cs[..., m:] - cs[..., :-m]  # [L, B, E, S - m + 1] counts in 0..m
    # one histogram per layer: bin = layer * (m + 1) + count. Integer counting is exact whatever
    # the order, so deterministic. On a GPU, histc on integers counts in shared memory per block:
    # index_add_ would send millions of global atomics to a few dozen addresses.
    nbins = L * (m + 1)
    bins = (win + _layer_base(L, m + 1, hit.device)).reshape(-1)
    hist = None
    if bins.is_cuda:
        try:
            hist = torch.histc(bins, bins=nbins, min=0, max=nbins - 1).long()
        except (RuntimeError, NotImplementedError):  # a torch without integer histc on this device
            hist = None
    if hist is None:  # CPU histc takes floats only (inexact past 2**24 per bin): count with index_add_
        hist = torch.zeros(nbins, dtype=torch.int64, device=hit.device).index_add_(0, bins, _ones(bins))
    return hist.view(L, m + 1), B * (S - m + 1)


def _layer_base(L: int, bins: int, device) -> torch.Tensor:
    return (torch.arange(L, dtype=torch.int32, device=device) * bins).view(L, 1, 1, 1)


_ONES: dict = {}


def _ones(like: torch.Tensor) -> torch.Tensor:
    """A cached int64 vector of ones as long as ``like`` (one launch fewer per layer and batch)."""
    key = (like.numel(), str(like.device))
    t = _ONES.get(key)
    if t is None:
        if len(_ONES) > 64:
            _ONES.clear()
        t = _ONES[key] = torch.ones(like.numel(), dtype=torch.int64, device=like.device)
    return t


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
        self.seqs.setdefault(layer_idx, []).append(seqs.to(small))  # stays on the device: no sync per batch
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
            stacked = torch.stack([torch.cat(self.seqs[li]) for li in layers])  # [L, N, S, k], on its device
            # the segment is the current token and the next m - 1 (authors' calc_fsf)
            rates = simulate_cache(stacked, E, max(m - 1, 0), sizes)  # [L, nC]
            for i, li in enumerate(layers):
                out[li] = rates[i]
        self.seqs.clear()
        return out


def simulate_cache(seqs, num_experts: int, m: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Hit rate [L, len(sizes)] of the m-token-lookahead cache for seqs [L, N, S, k].

    On a GPU tensor the simulation runs there (torch, rows in memory-bounded chunks); else in
    NumPy on the CPU, whose per-call cost on these small arrays is a fraction of torch's.
    The loop over token positions is sequential by nature.
    """
    if isinstance(seqs, torch.Tensor) and seqs.is_cuda:
        try:  # one Triton kernel when available (the torch loop costs ~25 launches a position)
            from ._sch_triton import simulate_cache_triton

            return simulate_cache_triton(seqs, num_experts, m, sizes)
        except Exception:  # no Triton, or a kernel/compiler problem: the same result in torch
            return _simulate_cache_torch(seqs, num_experts, m, sizes)
    seqs = seqs.cpu().numpy() if isinstance(seqs, torch.Tensor) else np.asarray(seqs)
    L, N, S, k = seqs.shape
    E, R, nC = num_experts, L * N, len(sizes)
    seqs = np.ascontiguousarray(seqs.reshape(R, S, k).astype(np.int64))
    C = np.asarray(sizes, dtype=np.int64)
    rows = np.arange(R)[:, None]
    cached = np.zeros((R, nC, E), dtype=bool)
    seen = np.zeros((R, E), dtype=bool)
    n_seen = np.zeros(R, dtype=np.int64)
    last_use = np.full((R, E), -1, dtype=np.int64)
    window = np.zeros((R, E), dtype=np.int64)  # uses in the next m tokens
    for t in range(min(m, S)):
        window[rows, seqs[:, t]] += 1
    tie = np.arange(E - 1, -1, -1)  # deterministic tie-break: lower expert index wins
    hits = np.zeros((R, nC), dtype=np.int64)
    top = np.iinfo(np.int64).max
    now = np.zeros((R, E), dtype=bool)
    for t in range(S):
        ids = seqs[:, t]  # [R, k]
        now[:] = False
        now[rows, ids] = True
        hits += (cached & now[:, None, :]).sum(-1)
        # first uses fill the cache's free slots for free (as the authors' code counts them)
        n_new = (~seen[rows, ids]).sum(1)
        hits += np.minimum(n_new[:, None], np.maximum(C[None, :] - n_seen[:, None], 0))
        seen |= now
        n_seen += n_new
        last_use[now] = t
        window -= now  # -> uses in (t, t + m]
        if t + m < S:
            window[rows, seqs[:, t + m]] += 1
        prio = (window * (S + 1) + (last_use + 1)) * E + tie
        prio[now] = top
        cand = cached | now[:, None, :]
        score = np.where(cand, prio[:, None, :], -1)
        for i, c in enumerate(sizes):  # keep the c highest priorities
            kth = -np.partition(-score[:, i, :], c - 1, axis=-1)[:, c - 1]
            cached[:, i, :] = cand[:, i, :] & (score[:, i, :] >= kth[:, None])
    return torch.from_numpy(hits.reshape(L, N, nC).sum(1) / (N * S * k)).float()


@torch.no_grad()
def _simulate_cache_torch(seqs: torch.Tensor, num_experts: int, m: int, sizes: tuple[int, ...],
                          max_elements: int = 1 << 28) -> torch.Tensor:
    """The same simulation as the NumPy path, in torch on the tensor's device."""
    L, N, S, k = seqs.shape
    E, nC, dev = num_experts, len(sizes), seqs.device
    flat = seqs.reshape(L * N, S, k).long()
    C = torch.tensor(sizes, dtype=torch.long, device=dev)
    tie = torch.arange(E - 1, -1, -1, device=dev)
    top = torch.iinfo(torch.long).max
    hits_all = []
    rows_per_chunk = max(1, max_elements // ((S + m) * E))
    for r0 in range(0, flat.shape[0], rows_per_chunk):
        ids = flat[r0 : r0 + rows_per_chunk]
        R = ids.shape[0]
        # one-hot uses, padded with m empty tokens so the window update needs no branch
        use = torch.zeros(R, S + m, E, dtype=torch.bool, device=dev)
        use[:, :S].scatter_(2, ids, True)
        window = use[:, :m].sum(1)
        cached = torch.zeros(R, nC, E, dtype=torch.bool, device=dev)
        seen = torch.zeros(R, E, dtype=torch.bool, device=dev)
        n_seen = torch.zeros(R, dtype=torch.long, device=dev)
        last_use = torch.full((R, E), -1, dtype=torch.long, device=dev)
        hits = torch.zeros(R, nC, dtype=torch.long, device=dev)
        for t in range(S):
            now = use[:, t]
            hits += (cached & now[:, None, :]).sum(-1)
            n_new = (now & ~seen).sum(-1)
            hits += torch.minimum(n_new[:, None], (C[None, :] - n_seen[:, None]).clamp_min(0))
            seen |= now
            n_seen += n_new
            last_use.masked_fill_(now, t)
            window += use[:, t + m].long() - now.long()
            prio = ((window * (S + 1) + (last_use + 1)) * E + tie).masked_fill_(now, top)
            cand = cached | now[:, None, :]
            score = torch.where(cand, prio[:, None, :], -1)
            kth = score.sort(dim=-1, descending=True).values.gather(2, (C - 1).expand(R, nC)[:, :, None])
            cached = cand & (score >= kth)
        hits_all.append(hits)
    hits = torch.cat(hits_all).reshape(L, N, nC).sum(1)
    return (hits.double() / (N * S * k)).float().cpu()
