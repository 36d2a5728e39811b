"""Check (on a CUDA machine) that the Triton SCH kernel equals the torch and NumPy simulations.

    python bench/sch_kernel_check.py

Random routings with some locality, shapes from tiny to Qwen3-30B-like (128 experts, top-8);
prints equality and timings. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.stats._sch_triton import simulate_cache_triton  # noqa: E402
from moecompress.stats.locality import _simulate_cache_torch, simulate_cache  # noqa: E402


def routing(L, N, S, E, k, g):
    """Top-k ids where each token keeps some of the previous token's experts (locality)."""
    out = torch.empty(L * N, S, k, dtype=torch.long)
    prev = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(L * N)])
    for t in range(S):
        fresh = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(L * N)])
        keep = torch.rand(L * N, generator=g) < 0.5
        row = torch.where(keep[:, None], prev, fresh)
        out[:, t] = row
        prev = row
    return out.reshape(L, N, S, k)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    bad = 0
    for L, N, S, E, k, m, sizes in [(2, 5, 60, 12, 3, 4, (3, 6, 12)), (4, 64, 512, 32, 4, 16, (4, 8, 16)),
                                    (8, 16, 512, 128, 8, 16, (8, 16, 32)), (3, 4, 100, 60, 6, 7, (6, 12, 24))]:
        seqs = routing(L, N, S, E, k, g)
        cu = seqs.cuda()
        ref = simulate_cache(seqs, E, m, sizes)  # NumPy
        simulate_cache_triton(cu, E, m, sizes)  # compile
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tri = simulate_cache_triton(cu, E, m, sizes)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        tor = _simulate_cache_torch(cu, E, m, sizes)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        ok = torch.equal(ref, tri) and torch.equal(ref, tor)
        bad += not ok
        print(f"L={L} N={N} S={S} E={E} k={k} m={m}: equal={ok}  triton {1e3 * (t1 - t0):.2f} ms  torch {1e3 * (t2 - t1):.1f} ms")
        if not ok:
            print("  numpy ", ref.tolist(), "\n  triton", tri.tolist(), "\n  torch ", tor.tolist())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
