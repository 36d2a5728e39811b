"""Re-fit solve speed: refit.ridge_solve (Cholesky inverse, one product) against linalg.solve (LU),
per expert, at the OLMoE-1B-7B, Qwen3-30B-A3B and DeepSeek-V3 expert shapes, on the GPU.

    python bench/ridge_solve_speed.py --json bench/results/ridge_solve_h200.json
"""
import argparse, json, sys, time
import torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ap = argparse.ArgumentParser(description=__doc__)
ap.add_argument("--json", type=Path)
a = ap.parse_args()
from moecompress.refit import ridge_solve
res = {}
torch.manual_seed(0)
for I, H, n in ((1024, 2048, 32), (768, 2048, 32), (2048, 7168, 16)):
    f = torch.randn(4 * I, I, device="cuda")
    g = f.T @ f
    rhs = torch.randn(I, H, device="cuda")
    lam = 0.01 * float(g.diagonal().mean())
    lamv = torch.full((I,), lam, device="cuda", dtype=torch.float64)
    def lu():
        a = g.double() + lam * torch.eye(I, dtype=torch.float64, device="cuda")
        return torch.linalg.solve(a, rhs.double())
    def chol():
        return ridge_solve(g, lamv, rhs)
    for fn in (lu, chol):
        fn(); torch.cuda.synchronize()
    out = {}
    for name, fn in (("lu", lu), ("cholesky_inverse", chol)):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(n):
            x = fn()
        torch.cuda.synchronize(); out[name + "_ms"] = 1000 * (time.perf_counter() - t0) / n
    a, b = lu(), chol()
    out["max_rel_diff"] = float((a - b).abs().max() / a.abs().max())
    res[f"I={I},H={H}"] = out
print(json.dumps(res, indent=1))
if a.json:
    a.json.write_text(json.dumps(res, indent=1) + "\n")
