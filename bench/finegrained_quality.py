"""Quality of fine-grained pruning on the testbed: perplexity after HEAPr, MoE-Pruner, Wanda,
magnitude (unstructured and 2:4) and STUN, each written with ``save_model`` and reloaded with
stock ``from_pretrained`` before it is measured.

  python bench/finegrained_quality.py [--model DIR] [--calib FILE] [--eval FILE ...] [--json OUT]

Perplexity: first 20k tokens of each file, non-overlapping 512-token windows, fp32, CPU (the
testbed's reference method). Calibration: 64 x 512 tokens of calib_mix.txt, seed 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.arch import moe_view  # noqa: E402
from moecompress.calibration import load_calibration  # noqa: E402
from moecompress.checkpoint import save_model  # noqa: E402
from moecompress.finegrained.api import finegrained_prune  # noqa: E402

TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbed"

# (label, method, options); "stun" rows need an expert-pruning first stage (see --stun-stage)
RUNS = [
    ("moe-pruner 50%", "moe-pruner", {"sparsity": 0.5}),
    ("wanda 50%", "wanda", {"sparsity": 0.5}),
    ("magnitude 50%", "magnitude", {"sparsity": 0.5}),
    ("moe-pruner 70%", "moe-pruner", {"sparsity": 0.7}),
    ("wanda 70%", "wanda", {"sparsity": 0.7}),
    ("moe-pruner 2:4", "moe-pruner", {"nm": "2:4"}),
    ("wanda 2:4", "wanda", {"nm": "2:4"}),
    ("heapr 25% (48/64 neurons per expert)", "heapr", {"ratio": 0.25}),
    ("heapr 25% global (masked zeros)", "heapr", {"ratio": 0.25, "heapr_global": True}),
    ("heapr 50% (32/64 neurons per expert)", "heapr", {"ratio": 0.5}),
    ("stun 50% = 24/32 experts + wanda 33%", "stun-unstructured",
     {"sparsity": 0.5, "stun_expert_ratio": 0.25, "stun_unstructured": "wanda"}),
    ("stun 50% = 24/32 experts + moe-pruner 33%", "stun-unstructured",
     {"sparsity": 0.5, "stun_expert_ratio": 0.25, "stun_unstructured": "moe-pruner"}),
    ("stun 50% = 28/32 experts + wanda 43%", "stun-unstructured",
     {"sparsity": 0.5, "stun_expert_ratio": 0.125, "stun_unstructured": "wanda"}),
]


def perplexity_of(model, ids: torch.Tensor, seq: int = 512) -> float:
    try:
        from moecompress.evaluate import perplexity
    except ImportError:  # the evaluate module not in this checkout: the testbed's reference loop
        nll, n = 0.0, 0
        with torch.no_grad():
            for s in range(0, len(ids) - 1, seq):
                x = ids[s:s + seq + 1]
                logits = model(x[None, :-1]).logits.float()[0]
                nll += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
                n += len(x) - 1
        return math.exp(nll / n)
    return perplexity(model, ids, seq)["ppl"]


def expert_params(model) -> int:
    """Nonzero routed-expert gate/up/down weights (what fine-grained pruning removes)."""
    return sum(int((getattr(layer, n) != 0).sum()) for layer in moe_view(model) for n in ("gate_proj", "up_proj", "down_proj"))


def stored_expert_params(model) -> int:
    return sum(getattr(layer, n).numel() for layer in moe_view(model) for n in ("gate_proj", "up_proj", "down_proj"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(TESTBED / "models" / "qwen3moe-32x64-top4"))
    ap.add_argument("--calib", default=str(TESTBED / "text" / "calib_mix.txt"))
    ap.add_argument("--eval", nargs="+", default=[str(TESTBED / "text" / f) for f in ("val_docs.txt", "val_code.txt")])
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="calibration draw")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only rows whose label starts with one of these")
    ap.add_argument("--stun-stage", default="stun",
                    help="expert-pruning method of moecompress.prune for STUN's first stage")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    calib = load_calibration(tok, a.calib, n=a.n, seq_len=a.seq_len, seed=a.seed)
    evals = {Path(f).stem: tok(Path(f).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][: a.max_tokens + 1]
             for f in a.eval}

    def load():
        return AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()

    base = load()
    results = [{"label": "base", "ppl": {k: perplexity_of(base, v) for k, v in evals.items()},
                "expert_params": expert_params(base), "stored_expert_params": stored_expert_params(base)}]
    base_params = results[0]["expert_params"]
    print(json.dumps(results[-1]), flush=True)
    for label, method, opts in RUNS:
        if a.only and not any(label.startswith(o) for o in a.only):
            continue
        model = load()
        opts = dict(opts)
        if method == "stun-unstructured":
            opts["stun_expert_method"] = a.stun_stage
        t = time.time()
        finegrained_prune(model, calib, method, progress=False, **opts)
        seconds = time.time() - t
        with tempfile.TemporaryDirectory() as d:
            save_model(model, Path(d), source=a.model, record={"stage": "bench", "method": method})
            reloaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        row = {"label": label, "method": method, "options": opts, "prune_seconds": round(seconds, 1),
               "ppl": {k: perplexity_of(reloaded, v) for k, v in evals.items()},
               "expert_params": expert_params(reloaded), "stored_expert_params": stored_expert_params(reloaded),
               "intermediate_size": moe_view(reloaded)[0].intermediate_size,
               "experts": moe_view(reloaded).num_experts}
        row["expert_params_removed"] = 1 - row["expert_params"] / base_params
        results.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| method | removed expert weights | stored expert weights | " + " | ".join(f"{k} ppl" for k in evals) + " | prune time |")
    print("|---|---|---|" + "---|" * len(evals) + "---|")
    for r in results:
        removed = r.get("expert_params_removed", 0.0)
        stored = r["stored_expert_params"] / results[0]["stored_expert_params"]
        ppl = " | ".join(f"{r['ppl'][k]:.2f}" for k in evals)
        print(f"| {r['label']} | {removed:.0%} | {stored:.0%} | {ppl} | {r.get('prune_seconds', '-')} s |")


if __name__ == "__main__":
    main()
