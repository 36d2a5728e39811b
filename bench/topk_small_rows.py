"""Exact top-k of many short rows on a GPU: ``torch.topk`` against two replacements, on the row
shapes of NAEE's search (every candidate set of a round, every token: rows = tokens x sets, width
= the set's size), with bf16-rounded logits so that ties occur as they do in the search. Checks
that each replacement gives topk's values and the same index sets (the order within the k may
differ, which the search's error does not see). docs/benchmarks.md, "Session 11".

  python bench/topk_small_rows.py      # writes $OUT/topk_mb.json (or ./topk_mb.json)
"""

import json
import os
import time

import torch

# (name, rows, width, k): one round of the search on the OLMoE-1B-7B shape (32,768 cached tokens,
# sets of 48 and 63), Qwen3-30B's (8,192 tokens, sets of 100), DeepSeek-V3's final top-8 and its
# group top-2 (here with 8,192 tokens; the library caches 2,048 for 256 experts)
SHAPES = [("olmoe_round", 32768 * 48, 48, 8), ("olmoe_round64", 32768 * 63, 63, 8),
          ("dsv3_final", 8192 * 200, 200, 8), ("dsv3_group", 8192 * 200 * 8, 25, 2), ("qwen30", 8192 * 100, 100, 8)]


def timed_ms(fn, reps: int = 5):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3, out


def by_sort(x: torch.Tensor, k: int):
    v, i = x.sort(dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


def by_max(x: torch.Tensor, k: int):
    """k rounds of (max, mask the maximum): argmax takes the first of equal values."""
    y = x.clone()
    vs, idx = [], []
    for _ in range(k):
        v, i = y.max(dim=-1, keepdim=True)
        vs.append(v)
        idx.append(i)
        y.scatter_(-1, i, float("-inf"))
    return torch.cat(vs, -1), torch.cat(idx, -1)


def main() -> None:
    dev = "cuda"
    res = {}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, rows, m, k in SHAPES:
        logits = (torch.randn(rows, m, device=dev, generator=g) * 2).to(torch.bfloat16)  # bf16 logits: ties
        x = torch.softmax(logits, dim=-1, dtype=torch.float)
        row, outs = {}, {}
        for label, fn in [("topk", lambda: torch.topk(x, k, dim=-1)),
                          ("topk_unsorted", lambda: torch.topk(x, k, dim=-1, sorted=False)),
                          ("sort", lambda: by_sort(x, k)), ("max", lambda: by_max(x, k))]:
            row[label], outs[label] = timed_ms(fn)
        ref_v, ref_i = outs["topk"]
        for label in ("sort", "max", "topk_unsorted"):
            v, i = outs[label]
            row[label + "_values_equal"] = bool(torch.equal(v.sort(-1, descending=True).values, ref_v))
            row[label + "_index_sets_equal"] = bool(torch.equal(i.sort(-1).values, ref_i.sort(-1).values))
            row[label + "_index_order_equal"] = bool(torch.equal(i, ref_i))
        top = x.topk(k + 1, dim=-1).values  # rows where the choice among equal values matters
        row["rows_with_tie_at_kth"] = int((top[:, k - 1] == top[:, k]).sum())
        res[name] = row
        print(name, json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "topk_mb.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
