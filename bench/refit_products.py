"""The re-fit's accumulated products F^T F and F^T R on one GPU: float32, TF32 and bf16 halves.

The re-fit (``moecompress/refit.py``) adds, per block of experts and batch, ``F^T F`` [n, I, I] and
``F^T R`` [n, I, H] to float32 accumulators, F [n, w, I] the routed features (bf16 expert
activations times a float32 routing weight), R [n, w, H] the float32 residual shares. Three ways:

* ``fp32``: float32 products (the CPU's way);
* ``tf32``: the same with TF32 switched on process-wide (``refit.accumulation_precision``, the
  re-fit's own switch, which ``refit.TF32_ACCUMULATION`` leaves on);
* ``bf16x3``: each operand split into two bf16 halves, ``x = hi + lo`` (``lo = bf16(x - hi)``),
  and ``a b ~ hi_a hi_b + hi_a lo_b + lo_a hi_b`` in bf16 products with float32 results
  (``out_dtype``): no process-wide switch, about 16 bits of each operand against TF32's 11.

Per shape: each way's time (median of repeats) and its largest error relative to the float64
product (max |err| / max |exact|), on features drawn like the re-fit's.

    python bench/refit_products.py --json OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from moecompress import refit

SHAPES = {  # (experts in a block, rows per expert, I, H): blocks of uncapped_block_elements in GPU memory
    "olmoe-1b-7b": (16, 4096, 1024, 2048),
    "qwen3-30b-a3b": (32, 2048, 768, 2048),
    "deepseek-v3": (4, 4096, 2048, 7168),
}


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def bf16x3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    (ah, al), (bh, bl) = halves(a), halves(b)
    out = torch.bmm(ah, bh, out_dtype=torch.float32)
    out += torch.bmm(ah, bl, out_dtype=torch.float32)
    out += torch.bmm(al, bh, out_dtype=torch.float32)
    return out


def plain(a, b, tf32: bool):
    """The float32 product, with TF32 switched on the way the re-fit switches it (or not)."""
    with refit.accumulation_precision(a.device) if tf32 else contextlib.nullcontext():
        return torch.bmm(a, b)


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    try:
        torch.bmm(torch.ones(1, 2, 2, device=dev, dtype=torch.bfloat16),
                  torch.ones(1, 2, 2, device=dev, dtype=torch.bfloat16), out_dtype=torch.float32)
        res["bmm_out_dtype"] = True
    except (TypeError, RuntimeError, NotImplementedError) as e:
        res["bmm_out_dtype"] = f"{type(e).__name__}: {e}"[:200]
    for name, (n, w, inter, hidden) in SHAPES.items():
        h = torch.randn(n, w, inter, device=dev, generator=g).to(torch.bfloat16)  # expert activations
        weight = torch.rand(n, w, 1, device=dev, generator=g)  # routing weights
        f = h.float() * weight
        r = torch.randn(n, w, hidden, device=dev, generator=g) * 0.1
        ft = f.transpose(1, 2)
        row = {}
        for what, (x, y) in {"gram": (ft, f), "rhs": (ft, r)}.items():
            exact = torch.bmm(x.double(), y.double())
            scale = float(exact.abs().max())
            ways = {"fp32": lambda: plain(x, y, False), "tf32": lambda: plain(x, y, True)}
            if res["bmm_out_dtype"] is True:
                ways["bf16x3"] = lambda: bf16x3(x, y)
            for way, fn in ways.items():
                out = fn()
                row[f"{what}_{way}_rel_err"] = float((out.double() - exact).abs().max()) / scale
                row[f"{what}_{way}_ms"] = 1e3 * timed(fn)
            del exact
        res["shapes"][name] = row
        print(name, json.dumps(row), flush=True)
    print("SUMMARY", json.dumps(res), flush=True)
    if a.json:
        open(a.json, "w").write(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
