"""NAEE's search with and without the incremental rule on a tiny random model (CPU).

Builds a tiny model of ``--family`` with the given experts and groups, runs
``plan_pruning(method="naee")`` twice, once as shipped and once with the family's rule off
(every candidate set routed by the router's own code), and reports the search time of each,
whether the kept sets are equal, and each layer's record (``incremental``, ``tied_share``,
``evaluated_sets``).

    OMP_NUM_THREADS=1 python bench/naee_rule_cpu.py --family deepseek_v3 --experts 64 --groups 8 \\
        --top-k 8 --keep 32 --json bench/results/naee_rule_cpu_dsv3like_s12.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moecompress.arch.view as view_module  # noqa: E402
import moecompress.prune.naee as naee  # noqa: E402
from moecompress.prune import plan_pruning  # noqa: E402
from moecompress.testing import tiny_model, tokens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="deepseek_v3")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--keep", type=int, default=32)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_model(a.family, n_routed_experts=a.experts, num_experts_per_tok=a.top_k, n_group=a.groups,
                       topk_group=max(1, a.groups // 2), hidden_size=128, moe_intermediate_size=32, num_hidden_layers=3)
    toks = tokens(16, 128)
    spent = [0.0]
    choose = naee._choose

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = choose(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    naee._choose = timed
    runs = {}
    rule = view_module.MoELayer.removal_effect
    try:
        for label in ("rule", "every set routed"):
            if label != "rule":
                view_module.MoELayer.removal_effect = property(lambda self: None)
            spent[0] = 0.0
            plan, _ = plan_pruning(model, keep=a.keep, method="naee", tokens=toks, batch_size=4)
            runs[label] = {"search_s": round(spent[0], 2), "kept": plan.kept, "layers": plan.info["layers"]}
    finally:
        naee._choose, view_module.MoELayer.removal_effect = choose, rule
    res = {"args": vars(a) | {"json": str(a.json)}, "kept_equal": runs["rule"]["kept"] == runs["every set routed"]["kept"],
           **{k: {"search_s": v["search_s"], "layers": v["layers"]} for k, v in runs.items()}}
    print(json.dumps({"kept_equal": res["kept_equal"], **{k: v["search_s"] for k, v in runs.items()}}))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
