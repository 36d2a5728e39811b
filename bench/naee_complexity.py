"""How NAEE's time grows with experts E, kept K, beam B and tokens T (CPU, small shapes).

A random Qwen3-MoE-shaped model (hidden 64, expert intermediate 32, top-4, 2 MoE layers)
is pruned to K = E / 2 with ``plan_pruning(..., method="naee")``; the script reports the wall
time per MoE layer, the evaluated candidate sets per layer and, separately, the time of the
Gram cache (``expert_gram``) on the same tokens. Run it against another checkout of the
package (``--src``) for a before/after table: only APIs that both have are used.

  python bench/naee_complexity.py --json out.json [--src OLD_CHECKOUT] [--grid E=16,32,64 T=1024 B=1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--grid", nargs="*", default=["E=16,32,64:T=1024:B=1", "E=32:T=256,4096:B=1", "E=32:T=1024:B=4"])
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    sys.path.insert(0, a.src)
    from moecompress.arch import moe_view
    from moecompress.prune import plan_pruning
    from moecompress.prune.naee import expert_gram
    from moecompress.testing import tiny_model, tokens

    torch.set_num_threads(1)
    rows = []
    for spec in a.grid:
        axes = {k: [int(v) for v in vals.split(",")] for k, _, vals in (p.partition("=") for p in spec.split(":"))}
        for E in axes["E"]:
            for T in axes["T"]:
                for B in axes["B"]:
                    model = tiny_model("qwen3_moe", num_experts=E, num_experts_per_tok=4, moe_intermediate_size=32,
                                       hidden_size=64, num_hidden_layers=2, mlp_only_layers=[], head_dim=16)
                    toks = tokens(T // 128, 128)
                    best = None
                    for _ in range(a.repeat):
                        start = time.perf_counter()
                        plan, _ = plan_pruning(model, keep=E // 2, method="naee", tokens=toks, batch_size=8,
                                               naee_beam=B, naee_max_combinations=0)
                        best = min(best or 1e9, time.perf_counter() - start)
                    layer = moe_view(model).layers[0]
                    x = torch.randn(T, 64)
                    start = time.perf_counter()
                    with torch.no_grad():
                        expert_gram(layer, x)
                    gram = time.perf_counter() - start
                    info = plan.info["layers"]
                    row = {"E": E, "K": E // 2, "B": B, "T": T, "seconds_per_layer": round(best / len(info), 4),
                           "gram_seconds_per_layer": round(gram, 4),
                           "evaluated_sets_per_layer": max(v["evaluated_sets"] for v in info.values())}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"src": a.src, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
