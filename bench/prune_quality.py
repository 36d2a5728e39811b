"""Quality of expert pruning on the testbed: every method x kept count x testbed model.

Each run is the one-liner a user types (``prune_checkpoint``, i.e. ``moecompress prune``):
load, calibrate, select, write the checkpoint; the SAVED checkpoint is then reloaded with
stock ``from_pretrained`` in float32 and its perplexity measured on the first 20k tokens of
val_docs / val_code / val_quotes (non-overlapping 512-token windows, the testbed's reference
method). Calibration: 64 x 512 tokens of calib_mix.txt, seed 0. "time" is the wall time of
``prune_checkpoint`` (loading, calibration statistics, selection, writing).

  python bench/prune_quality.py [--models qwen3moe-32x64-top4 mixtral-8x256-top2]
      [--methods ...] [--keeps qwen3moe-32x64-top4=24,16,8 mixtral-8x256-top2=6,4,2]
      [--device cpu|cuda] [--domain] [--option naee_beam=4] [--json OUT] [--markdown OUT]

``--domain`` adds the domain-calibration runs (calib_code vs calib_docs, 16 of 32, qwen).
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

from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.prune import DEFAULT_METHOD, METHODS, prune_checkpoint  # noqa: E402

TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbed"
EVAL_FILES = ("val_docs.txt", "val_code.txt", "val_quotes.txt")
KEEPS = {"qwen3moe-32x64-top4": (24, 16, 8), "mixtral-8x256-top2": (6, 4, 2)}
# The testbed README's frequency column (qwen3moe, docs / code / quotes): the bar to beat.
REFERENCE = {24: (13.78, 8.75, 62.58), 16: (18.48, 13.11, 77.99)}


def evaluate(folder: Path, ids: dict[str, torch.Tensor], device: str) -> dict[str, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return {name: round(perplexity(model, t, 512)["ppl"], 2) for name, t in ids.items()}


def parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        out[k] = json.loads(v) if v[:1].isdigit() or v in ("true", "false") or v[:1] == "-" else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(TESTBED))
    ap.add_argument("--models", nargs="+", default=list(KEEPS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--keeps", nargs="*", default=[], help="MODEL=K1,K2,... (default: 24,16,8 / 6,4,2)")
    ap.add_argument("--calib", default="calib_mix.txt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--domain", action="store_true", help="also calib_code / calib_docs at 16 of 32 (qwen)")
    ap.add_argument("--option", action="append", default=[], help="method option KEY=VALUE (repeatable)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args()
    torch.manual_seed(0)
    tb = Path(a.testbed)
    keeps = dict(KEEPS)
    for item in a.keeps:
        name, _, ks = item.partition("=")
        keeps[name] = tuple(int(k) for k in ks.split(","))
    options = parse_options(a.option)
    device = None if a.device == "cpu" else a.device
    rows = []
    for name in a.models:
        src = tb / "models" / name
        tok = AutoTokenizer.from_pretrained(src)
        ids = {f.split("_")[1].split(".")[0]: load_text_tokens(tok, tb / "text" / f, 20_000) for f in EVAL_FILES}
        base = evaluate(src, ids, a.device)
        rows.append({"model": name, "method": "(base)", "keep": None, "calib": None, "ppl": base, "seconds": None})
        print(json.dumps(rows[-1]), flush=True)
        runs = [(m, k, a.calib) for k in keeps[name] for m in a.methods]
        if a.domain and name.startswith("qwen"):
            runs += [(m, 16, c) for m in dict.fromkeys([DEFAULT_METHOD, "frequency"]) for c in ("calib_code.txt", "calib_docs.txt")]
        for method, keep, calib in runs:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "pruned"
                start = time.perf_counter()
                prune_checkpoint(src, out, keep=keep, method=method, calib=str(tb / "text" / calib), n=64, seq_len=512,
                                 seed=0, device=device, progress=False, **options)
                seconds = time.perf_counter() - start
                ppl = evaluate(out, ids, a.device)
            rows.append({"model": name, "method": method, "keep": keep, "calib": calib, "ppl": ppl,
                         "seconds": round(seconds, 1), "options": options})
            print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    if a.markdown:
        a.markdown.write_text(markdown(rows, keeps))


def markdown(rows: list[dict], keeps: dict) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        base = next(r for r in mine if r["keep"] is None)["ppl"]
        n_experts = 32 if name.startswith("qwen") else 8
        lines += [f"**{name}** (base: docs {base['docs']:.2f} / code {base['code']:.2f} / quotes {base['quotes']:.2f})", "",
                  "| method | " + " | ".join(f"{k} of {n_experts}: docs / code / quotes (time)" for k in keeps[name]) + " |",
                  "|---|" + "---|" * len(keeps[name])]
        main = [r for r in mine if r["keep"] is not None and r["calib"] == "calib_mix.txt"]
        for method in dict.fromkeys(r["method"] for r in main):
            cells = []
            for k in keeps[name]:
                r = next((r for r in main if r["method"] == method and r["keep"] == k), None)
                cells.append("—" if r is None else
                             f"{r['ppl']['docs']:.2f} / {r['ppl']['code']:.2f} / {r['ppl']['quotes']:.2f} ({r['seconds']:.0f} s)")
            label = f"**{method}** (default)" if method == DEFAULT_METHOD else method
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if name.startswith("qwen"):
            ref = [f"{REFERENCE[k][0]:.2f} / {REFERENCE[k][1]:.2f} / {REFERENCE[k][2]:.2f}" if k in REFERENCE else "—"
                   for k in keeps[name]]
            lines.append("| *testbed README frequency (reference)* | " + " | ".join(ref) + " |")
        lines.append("")
        dom = [r for r in mine if r["keep"] is not None and r["calib"] != "calib_mix.txt"]
        if dom:
            lines += ["| method, 16 of 32 | calibration | docs ppl | code ppl | quotes ppl |", "|---|---|---|---|---|"]
            mix = {r["method"]: r for r in main if r["keep"] == 16}
            for r in sorted(dom + [mix[m] for m in dict.fromkeys(d["method"] for d in dom) if m in mix],
                            key=lambda r: (r["method"], r["calib"])):
                lines.append(f"| {r['method']} | {r['calib']} | {r['ppl']['docs']:.2f} | {r['ppl']['code']:.2f} | "
                             f"{r['ppl']['quotes']:.2f} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
