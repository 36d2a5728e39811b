"""Quality of expert merging vs frequency pruning on the testbed (qwen3moe-32x64-top4).

Each merge run is what ``moecompress merge`` does (``merge_checkpoint``): load, calibrate on
64 x 512 tokens of calib_mix.txt (seed 0), cluster, merge, optionally re-fit, write the
checkpoint; the SAVED checkpoint is reloaded with stock ``from_pretrained`` in float32 and
its perplexity measured on the first 20k tokens of val_docs / val_code / val_quotes
(non-overlapping 512-token windows, the testbed's reference method).

Pruning rows: the testbed README's reference table (frequency = top-k hit count, 24 and 16
kept), ``moecompress prune --method frequency`` when :mod:`moecompress.prune` is installed,
and frequency pruning followed by the same least-squares re-fit the merge uses (to tell what
merging itself brings from what the re-fit brings).

  python bench/merge_quality.py [--keeps 24 16 8] [--methods m-smoe hc-smoe average]
      [--refit both|on|off] [--router dominant|weighted] [--ridge 0.01] [--no-prune] [--testbed DIR]
      [--threads N] [--json OUT] [--markdown OUT]
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
from moecompress.capture import run_calibration  # noqa: E402
from moecompress.checkpoint import load_model, save_model  # noqa: E402
from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.merge import DEFAULT_METHOD, DEFAULT_RIDGE, METHODS, merge_checkpoint  # noqa: E402
from moecompress.merge.cluster import top_frequent  # noqa: E402
from moecompress.merge.observe import MergeObserver  # noqa: E402
from moecompress.refit import refit_to_original, swap_in_copies  # noqa: E402

TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbed"
MODEL = "qwen3moe-32x64-top4"
EVAL_FILES = ("val_docs.txt", "val_code.txt", "val_quotes.txt")
# The testbed README's reference pruning (docs / code / quotes), calib_mix 64 x 512.
REFERENCE = {"frequency": {24: (13.78, 8.75, 62.58), 16: (18.48, 13.11, 77.99)},
             "random": {24: (15.84, 10.36, 68.33), 16: (22.81, 14.49, 119.69)},
             "REAP-style": {24: (14.73, 10.80, 61.86), 16: (29.06, 24.31, 83.73)}}


def evaluate(folder: Path, ids: dict[str, torch.Tensor]) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {name: round(perplexity(model, t, 512)["ppl"], 2) for name, t in ids.items()}


def prune_and_refit(src: Path, out: Path, tokens: torch.Tensor, keep: int) -> None:
    """Frequency pruning (top-k hit count) + the merge's least-squares re-fit, saved like a stage."""
    model = load_model(src, dtype="float32")
    obs = MergeObserver(outputs=False, logits=False)
    run_calibration(model, tokens, [obs], progress=False)
    view = moe_view(model)
    kept = {layer.layer_idx: top_frequent(obs.count[layer.layer_idx], keep) for layer in view}
    originals = swap_in_copies(model, view)
    moe_view(model).keep_experts(kept)
    refit_to_original(model, originals, tokens, ridge=DEFAULT_RIDGE, progress=False)
    model.to(torch.bfloat16)
    save_model(model, out, source=src)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(TESTBED))
    ap.add_argument("--keeps", nargs="+", type=int, default=[24, 16, 8])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--refit", choices=("both", "on", "off"), default="both")
    ap.add_argument("--router", default="dominant", help="router rule of the merge runs (dominant, weighted)")
    ap.add_argument("--ridge", type=float, default=DEFAULT_RIDGE, help="ridge strength of the merge runs' re-fit")
    ap.add_argument("--no-prune", action="store_true", help="skip the pruning runs")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tb = Path(a.testbed)
    src = tb / "models" / MODEL
    calib = tb / "text" / "calib_mix.txt"
    tok = AutoTokenizer.from_pretrained(src)
    ids = {f.split("_")[1].split(".")[0]: load_text_tokens(tok, tb / "text" / f, 20_000) for f in EVAL_FILES}
    tokens = load_calibration(tok, calib, n=64, seq_len=512, seed=0)
    rows = [{"keep": 32, "run": "base", "refit": None, **evaluate(src, ids), "seconds": None}]
    print(rows[-1], flush=True)
    refits = {"both": (False, True), "on": (True,), "off": (False,)}[a.refit]
    try:
        from moecompress.prune import prune_checkpoint
    except ImportError:
        prune_checkpoint = None
    with tempfile.TemporaryDirectory() as tmp:
        for keep in a.keeps:
            for method in a.methods:
                for refit in refits:
                    out = Path(tmp) / f"{method}-{keep}-{refit}"
                    t = time.perf_counter()
                    merge_checkpoint(src, out, keep=keep, method=method, calib=str(calib), n=64, seq_len=512, seed=0,
                                     refit=refit, router=a.router, ridge=a.ridge, progress=False)
                    label = f"merge {method}" + (f", router {a.router}" if a.router != "dominant" else "") + \
                        (f", ridge {a.ridge:g}" if refit and a.ridge != DEFAULT_RIDGE else "")
                    rows.append({"keep": keep, "run": label, "refit": refit, **evaluate(out, ids),
                                 "seconds": round(time.perf_counter() - t, 1)})
                    print(rows[-1], flush=True)
            if a.no_prune:
                continue
            for name, table in REFERENCE.items():
                if keep in table:
                    rows.append({"keep": keep, "run": f"prune {name} (testbed README)", "refit": False,
                                 **dict(zip(ids, table[keep])), "seconds": None})
            if prune_checkpoint is not None:
                out = Path(tmp) / f"prune-{keep}"
                t = time.perf_counter()
                prune_checkpoint(src, out, keep=keep, method="frequency", calib=str(calib), n=64, seq_len=512, seed=0,
                                 progress=False)
                rows.append({"keep": keep, "run": "prune frequency (moecompress prune)", "refit": False,
                             **evaluate(out, ids), "seconds": round(time.perf_counter() - t, 1)})
                print(rows[-1], flush=True)
            out = Path(tmp) / f"prune-refit-{keep}"
            t = time.perf_counter()
            prune_and_refit(src, out, tokens, keep)
            rows.append({"keep": keep, "run": "prune frequency + re-fit", "refit": True, **evaluate(out, ids),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
    if a.json:
        a.json.write_text(json.dumps({"model": MODEL, "default_method": DEFAULT_METHOD, "rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    print(table)
    if a.markdown:
        a.markdown.write_text(table)


def markdown(rows: list[dict]) -> str:
    lines = ["| kept | run | re-fit | docs | code | quotes | time (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        refit = "" if r["refit"] is None else ("yes" if r["refit"] else "no")
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['keep']} of 32 | {r['run']} | {refit} | {r['docs']:.2f} | {r['code']:.2f} | "
                     f"{r['quotes']:.2f} | {secs} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
