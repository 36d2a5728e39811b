"""Quality of fine-grained pruning on the testbed: perplexity after HEAPr, MoE-Pruner, Wanda,
magnitude (unstructured and 2:4) and STUN, each written with ``save_model`` and reloaded with
stock ``from_pretrained`` before it is measured.

  python bench/finegrained_quality.py [--model DIR] [--calib FILE] [--eval FILE ...] [--json OUT]
      [-n 64] [--seq-len 512] [--seeds 0 1 2 ...] [--only "moe-pruner 50,wanda 50"] [--threads 1]

Perplexity: first 20k tokens of each file, non-overlapping 512-token windows, fp32, CPU (the
testbed's reference method). Calibration: ``-n`` x ``--seq-len`` tokens of calib_mix.txt drawn
with each of ``--seeds`` (default 64 x 512, seed 0). Every run of one seed gets the very same
calibration tensor (its sha256 is recorded in each row), so MoE-Pruner and Wanda always see
identical tokens. With several seeds the summary gives each row's mean and standard deviation
over seeds, and the paired per-seed difference of every "moe-pruner X" row to its "wanda X" row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
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


def selected(label: str, only: list[str] | None) -> bool:
    """``--only`` takes label prefixes, as separate words or comma-separated."""
    if not only:
        return True
    prefixes = [p.strip() for o in only for p in o.split(",") if p.strip()]
    return any(label.startswith(p) for p in prefixes)


def tokens_digest(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def summarize(rows: list[dict], evals: list[str]) -> dict:
    """Per label: mean / sample std over seeds of each eval's ppl; paired moe-pruner - wanda deltas."""
    by_label: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], {})[r["seed"]] = r["ppl"]
    out = {"rows": {}, "pairs": {}}
    for label, per_seed in by_label.items():
        out["rows"][label] = {k: {"mean": statistics.fmean(p[k] for p in per_seed.values()),
                                  "std": statistics.stdev(p[k] for p in per_seed.values()) if len(per_seed) > 1 else 0.0,
                                  "seeds": len(per_seed)} for k in evals}
        if label.startswith("moe-pruner "):
            other = "wanda " + label[len("moe-pruner "):]
            if other in by_label:
                seeds = sorted(set(per_seed) & set(by_label[other]))
                pair = {}
                for k in evals:
                    d = [per_seed[s][k] - by_label[other][s][k] for s in seeds]
                    pair[k] = {"delta_per_seed": dict(zip(seeds, d)), "mean_delta": statistics.fmean(d),
                               "std_delta": statistics.stdev(d) if len(d) > 1 else 0.0,
                               "moe_pruner_lower": sum(x < 0 for x in d), "seeds": len(d)}
                out["pairs"][f"{label} vs {other}"] = pair
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(TESTBED / "models" / "qwen3moe-32x64-top4"))
    ap.add_argument("--calib", default=str(TESTBED / "text" / "calib_mix.txt"))
    ap.add_argument("--eval", nargs="+", default=[str(TESTBED / "text" / f) for f in ("val_docs.txt", "val_code.txt")])
    ap.add_argument("-n", type=int, default=64, help="calibration sequences")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    ap.add_argument("--seeds", type=int, nargs="+", help="calibration draws, one full set of runs each (default: 0)")
    ap.add_argument("--seed", type=int, help="one calibration draw (same as --seeds SEED)")
    ap.add_argument("--max-tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="run only rows whose label starts with one of these "
                                              "(separate words or comma-separated, e.g. 'moe-pruner 50,wanda 50')")
    ap.add_argument("--stun-stage", default="stun",
                    help="expert-pruning method of moecompress.prune for STUN's first stage")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.seeds and a.seed is not None:
        ap.error("give --seeds or --seed, not both")
    seeds = a.seeds or [0 if a.seed is None else a.seed]
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    evals = {Path(f).stem: tok(Path(f).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0][: a.max_tokens + 1]
             for f in a.eval}

    def load():
        return AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()

    base = load()
    base_row = {"label": "base", "ppl": {k: perplexity_of(base, v) for k, v in evals.items()},
                "expert_params": expert_params(base), "stored_expert_params": stored_expert_params(base)}
    base_params = base_row["expert_params"]
    print(json.dumps(base_row), flush=True)
    rows = []
    for seed in seeds:
        calib = load_calibration(tok, a.calib, n=a.n, seq_len=a.seq_len, seed=seed)
        calib_id = {"seed": seed, "n": a.n, "seq_len": a.seq_len, "calib_sha256": tokens_digest(calib)}
        for label, method, opts in RUNS:
            if not selected(label, a.only):
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
            row = {"label": label, "method": method, "options": opts, **calib_id, "prune_seconds": round(seconds, 1),
                   "ppl": {k: perplexity_of(reloaded, v) for k, v in evals.items()},
                   "expert_params": expert_params(reloaded), "stored_expert_params": stored_expert_params(reloaded),
                   "intermediate_size": moe_view(reloaded)[0].intermediate_size,
                   "experts": moe_view(reloaded).num_experts}
            row["expert_params_removed"] = 1 - row["expert_params"] / base_params
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarize(rows, list(evals))
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "calib": a.calib, "n": a.n, "seq_len": a.seq_len,
                                      "seeds": seeds, "max_tokens": a.max_tokens, "base": base_row, "runs": rows,
                                      "summary": summary}, indent=2) + "\n")
    multi = len(seeds) > 1
    print(f"\ncalibration: {a.n} x {a.seq_len} tokens of {Path(a.calib).name}, seeds {seeds}")
    print("\n| method | seed | removed expert weights | stored expert weights | "
          + " | ".join(f"{k} ppl" for k in evals) + " | prune time |")
    print("|---|---|---|---|" + "---|" * len(evals) + "---|")
    for r in [base_row, *rows]:
        removed = r.get("expert_params_removed", 0.0)
        stored = r["stored_expert_params"] / base_row["stored_expert_params"]
        ppl = " | ".join(f"{r['ppl'][k]:.3f}" for k in evals)
        print(f"| {r['label']} | {r.get('seed', '-')} | {removed:.0%} | {stored:.0%} | {ppl} | {r.get('prune_seconds', '-')} s |")
    if multi:
        print("\n| method | " + " | ".join(f"{k} ppl mean +- std ({len(seeds)} seeds)" for k in evals) + " |")
        print("|---|" + "---|" * len(evals))
        for label, st in summary["rows"].items():
            print(f"| {label} | " + " | ".join(f"{st[k]['mean']:.3f} +- {st[k]['std']:.3f}" for k in evals) + " |")
    for name, pair in summary["pairs"].items():
        print(f"\n{name} (paired ppl difference, negative = moe-pruner better):")
        for k in evals:
            p = pair[k]
            per = ", ".join(f"{s}: {d:+.3f}" for s, d in p["delta_per_seed"].items())
            print(f"  {k}: mean {p['mean_delta']:+.4f} +- {p['std_delta']:.4f}; moe-pruner lower at "
                  f"{p['moe_pruner_lower']}/{p['seeds']} seeds ({per})")


if __name__ == "__main__":
    main()
