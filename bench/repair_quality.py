"""Repair after removal on the testbed: pruning methods x repair x kept counts x calibration seeds.

For each testbed model, calibration seed and kept count, each variant is what ``moecompress
prune --method M --repair R`` computes (the same library calls as ``prune_checkpoint``: the
kept sets of ``plan_experts``, ``repair.prune_and_repair``), written with ``save_model`` in the
checkpoint's dtype, reloaded with stock ``from_pretrained`` in float32, and its perplexity
measured on the first 20k tokens of val_docs / val_code / val_quotes (512-token windows).
Calibration: 64 x 512 tokens of calib_mix.txt drawn with the seed (the seed also seeds NAEE's
token subsample, as in ``prune_checkpoint``). To be economical on a shared CPU the statistics
are collected once per seed and the kept sets are cached (``--cache``); "repair_s" is the wall
time of the repair alone, "select_s" of the selection.

  OMP_NUM_THREADS=1 python bench/repair_quality.py --models qwen3moe-32x64-top4 --seeds 0 1 2 \\
      --json bench/results/repair_quality_qwen.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.arch import moe_view  # noqa: E402
from moecompress.calibration import load_calibration  # noqa: E402
from moecompress.checkpoint import load_model, save_model  # noqa: E402
from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.prune.api import plan_experts  # noqa: E402
from moecompress.repair import prune_and_repair  # noqa: E402
from moecompress.stats import collect_stats  # noqa: E402

TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbed"
KEEPS = {"qwen3moe-32x64-top4": (24, 16, 8), "mixtral-8x256-top2": (6, 4, 2)}
VARIANTS = (("naee", "none"), ("naee", "refit"), ("frequency", "none"), ("frequency", "refit"),
            ("weighted-ean-sum", "none"))


def evaluate(folder: Path, ids: dict[str, torch.Tensor]) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {name: round(perplexity(model, t, 512)["ppl"], 3) for name, t in ids.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(TESTBED))
    ap.add_argument("--models", nargs="+", default=list(KEEPS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=[f"{m}:{r}" for m, r in VARIANTS], help="METHOD:REPAIR")
    ap.add_argument("--keeps", nargs="*", default=[], help="MODEL=K1,K2,...")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moecompress-repair-bench")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    tb = Path(a.testbed)
    keeps = dict(KEEPS)
    for item in a.keeps:
        name, _, ks = item.partition("=")
        keeps[name] = tuple(int(k) for k in ks.split(","))
    variants = [tuple(v.split(":")) for v in a.variants]
    a.cache.mkdir(parents=True, exist_ok=True)
    rows = json.loads(a.json.read_text()) if a.json and a.json.exists() else []
    done = {(r["model"], r["seed"], r["keep"], r["method"], r["repair"]) for r in rows}
    for name in a.models:
        src = tb / "models" / name
        tok = AutoTokenizer.from_pretrained(src)
        ids = {f.split("_")[1].split(".")[0]: load_text_tokens(tok, tb / "text" / f, 20_000)
               for f in ("val_docs.txt", "val_code.txt", "val_quotes.txt")}
        for seed in a.seeds:
            tokens = load_calibration(tok, str(tb / "text" / "calib_mix.txt"), n=64, seq_len=512, seed=seed)
            stats = None
            for keep in keeps[name]:
                for method, repair in variants:
                    if (name, seed, keep, method, repair) in done:
                        continue
                    cache = a.cache / f"{name}-{method}-{keep}-seed{seed}.json"
                    select_s = None
                    if cache.exists():
                        kept = {int(k): v for k, v in json.loads(cache.read_text()).items()}
                    else:
                        model = load_model(src, dtype="float32")
                        if method != "naee" and stats is None:
                            stats = collect_stats(model, tokens, progress=False)
                        t = time.perf_counter()
                        kept = plan_experts(model, keep=keep, method=method, tokens=tokens, stats=stats,
                                            seed=seed).kept
                        select_s = round(time.perf_counter() - t, 1)
                        cache.write_text(json.dumps(kept))
                    model = load_model(src, dtype="float32")
                    t = time.perf_counter()
                    record = None
                    if repair == "none":
                        moe_view(model).keep_experts(kept)
                    else:
                        record = prune_and_repair(model, kept, tokens, mode=repair, progress=False)
                    repair_s = round(time.perf_counter() - t, 1)
                    with tempfile.TemporaryDirectory() as tmp:
                        model.to(torch.bfloat16)  # the testbed checkpoints' dtype
                        save_model(model, Path(tmp) / "m", source=src)
                        ppl = evaluate(Path(tmp) / "m", ids)
                    rows.append({"model": name, "seed": seed, "keep": keep, "method": method, "repair": repair,
                                 "ppl": ppl, "select_s": select_s, "repair_s": repair_s if repair != "none" else None,
                                 "errors": {li: v.get("relative_error") for li, v in record["layers"].items()}
                                 if record else None})
                    print(json.dumps(rows[-1]), flush=True)
                    if a.json:
                        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
