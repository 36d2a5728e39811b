"""Quality of expert quantization on the testbed: scheme x bits x quantizer x allocation.

Each run is what a user types (``quantize_checkpoint``, i.e. ``moecompress quantize``): load,
calibrate on 64 x 512 tokens of calib_mix.txt drawn with the seed, quantize the experts only
(attention / LM head untouched), group size 64, write the checkpoint; the SAVED checkpoint is
reloaded with stock ``from_pretrained`` in float32 and its perplexity measured on the first 20k
tokens of val_docs.txt (non-overlapping 512-token windows, the testbed's reference method).
Every figure is the mean over calibration seeds 0, 1, 2 (RTN uniform needs no calibration: once).

Research allocations (per-expert widths, 2-3 bits) are written in the ``fake`` format (dequantized
weights + bit map); uniform 4/8-bit runs in ``compressed-tensors`` (their bytes on disk are real).
"bits" is the honest average per expert weight: weights + one bf16 scale per 64 weights.

  python bench/quantize_quality.py [--models qwen3moe-32x64-top4 mixtral-8x256-top2] [--seeds 0 1 2]
      [--runs NAME ...] [--pipeline] [--json OUT] [--markdown OUT]

``--pipeline``: ``prune --keep 24`` then ``quantize --format compressed-tensors --scheme w4a16`` on
qwen3moe; size on disk against the expected (4 bits + scales for the experts, the rest as stored)
and a reload in transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.quantize import quantize_checkpoint  # noqa: E402

TESTBED = Path("/work/shared/testbed") if Path("/work/shared/testbed").exists() else Path(__file__).resolve().parents[2] / "shared" / "testbed"
GROUP = 64
# name -> (options, seeded); candidates 2,3,4 for the mixed-precision comparisons (the issue's)
MIX = dict(candidates=[2, 3, 4], quantizer="gptq", format="fake")
RUNS = {
    "rtn-w4": (dict(quantizer="rtn", scheme="w4a16"), False),
    "gptq-w4": (dict(quantizer="gptq", scheme="w4a16"), True),
    "gptq-w8": (dict(quantizer="gptq", scheme="w8a16"), True),
    "rtn-uniform-3": (dict(quantizer="rtn", bits=3, format="fake"), False),
    "gptq-uniform-3": (dict(quantizer="gptq", bits=3, format="fake"), True),
    "mc-moe-expert-3.0": (dict(MIX, granularity="expert", bits=3.0), True),
    "random-expert-3.0": (dict(MIX, granularity="expert", bits=3.0, allocation="random"), True),
    "frequency-expert-3.0": (dict(MIX, granularity="expert", bits=3.0, allocation="frequency"), True),
    "mc-moe-layer-3.0": (dict(MIX, granularity="layer", bits=3.0), True),
    "mc-moe-expert-2.5": (dict(MIX, granularity="expert", bits=2.5), True),
    "frequency-expert-2.5": (dict(MIX, granularity="expert", bits=2.5, allocation="frequency"), True),
    "gptq-uniform-2": (dict(quantizer="gptq", bits=2, format="fake"), True),
}


def ppl(folder: Path, ids: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return perplexity(model, ids, 512)["ppl"]


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_one(src: Path, calib: Path, ids, opts: dict, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        start = time.perf_counter()
        res = quantize_checkpoint(src, out, calib=str(calib), n=64, seq_len=512, seed=seed, group_size=GROUP,
                                  progress=False, **opts)
        seconds = time.perf_counter() - start
        return {"ppl": ppl(out, ids), "seconds": seconds, "bits": res.average_bits, "width": res.average_width,
                "expert_bytes": res.total_bits / 8, "disk_bytes": disk_bytes(out), "fallbacks": len(res.fallbacks),
                "widths": {str(k): v for k, v in res.widths.items()} if opts.get("granularity") == "expert"
                else {str(k): v[0] for k, v in res.widths.items()}}


def pipeline(tb: Path, ids) -> dict:
    """prune (naee, keep 24) && quantize (compressed-tensors w4a16, group 64): size and reload."""
    from safetensors import safe_open

    from moecompress.prune import prune_checkpoint

    src, calib = tb / "models" / "qwen3moe-32x64-top4", tb / "text" / "calib_mix.txt"
    with tempfile.TemporaryDirectory() as tmp:
        pruned, quant = Path(tmp) / "pruned", Path(tmp) / "w4"
        prune_checkpoint(src, pruned, keep=24, calib=str(calib), progress=False)
        res = quantize_checkpoint(pruned, quant, scheme="w4a16", quantizer="gptq", group_size=GROUP, calib=str(calib),
                                  progress=False)
        expert_w, other = 0, 0
        for f in pruned.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    t = h.get_slice(k)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    if ".experts." in k:
                        expert_w += n
                    else:
                        other += n * 2  # bf16
        expected = other + expert_w * (4 + 16 / GROUP) / 8
        actual = disk_bytes(quant)
        return {"pruned_bytes": disk_bytes(pruned), "quantized_bytes": actual, "expected_bytes": expected,
                "ratio": actual / expected, "ppl_pruned": ppl(pruned, ids), "ppl_quantized": ppl(quant, ids),
                "bits": res.average_bits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(TESTBED))
    ap.add_argument("--models", nargs="+", default=["qwen3moe-32x64-top4", "mixtral-8x256-top2"])
    ap.add_argument("--runs", nargs="+", default=[r for r in RUNS if r not in ("gptq-w8", "gptq-uniform-2")])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args()
    tb = Path(a.testbed)
    out: dict = {"rows": [], "pipeline": None}
    for name in a.models:
        src = tb / "models" / name
        tok = AutoTokenizer.from_pretrained(src)
        ids = load_text_tokens(tok, tb / "text" / "val_docs.txt", 20_000)
        out["rows"].append({"model": name, "run": "base", "ppl": ppl(src, ids), "disk_bytes": disk_bytes(src)})
        print(json.dumps(out["rows"][-1]), flush=True)
        for run in a.runs:
            opts, seeded = RUNS[run]
            per = [run_one(src, tb / "text" / "calib_mix.txt", ids, opts, s) for s in (a.seeds if seeded else a.seeds[:1])]
            row = {"model": name, "run": run, "options": opts, "seeds": a.seeds if seeded else a.seeds[:1],
                   "ppl": statistics.mean(p["ppl"] for p in per), "ppl_each": [p["ppl"] for p in per],
                   **{k: per[0][k] for k in ("bits", "width", "expert_bytes", "disk_bytes")},
                   "seconds": statistics.mean(p["seconds"] for p in per),
                   "fallbacks": [p["fallbacks"] for p in per], "widths": [p["widths"] for p in per]}
            out["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
    if a.pipeline:
        tok = AutoTokenizer.from_pretrained(tb / "models" / "qwen3moe-32x64-top4")
        out["pipeline"] = pipeline(tb, load_text_tokens(tok, tb / "text" / "val_docs.txt", 20_000))
        print(json.dumps(out["pipeline"]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    if a.markdown:
        a.markdown.write_text(markdown(out))


def markdown(out: dict) -> str:
    lines = []
    for name in dict.fromkeys(r["model"] for r in out["rows"]):
        rows = [r for r in out["rows"] if r["model"] == name]
        base = rows[0]
        lines += [f"**{name}** (base: val_docs {base['ppl']:.2f}, {base['disk_bytes'] / 2**20:.2f} MiB on disk)", "",
                  "| run | format | quantizer | allocation | avg width | bits/weight (honest) | expert MiB | MiB on disk "
                  "| val_docs ppl (mean of seeds) | per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows[1:]:
            o = r["options"]
            alloc = (o.get("allocation", "mc-moe") + f" / {o['granularity']}") if o.get("granularity") else "uniform"
            lines.append(f"| {r['run']} | {o.get('format', 'compressed-tensors')} | {o['quantizer']} | {alloc} | "
                         f"{r['width']:.2f} | {r['bits']:.3f} | {r['expert_bytes'] / 2**20:.2f} | "
                         f"{r['disk_bytes'] / 2**20:.2f} | {r['ppl']:.2f} | "
                         + " / ".join(f"{p:.2f}" for p in r["ppl_each"]) + " |")
        lines.append("")
    p = out.get("pipeline")
    if p:
        lines += [f"prune --keep 24 && quantize --scheme w4a16 (qwen3moe): {p['quantized_bytes'] / 2**20:.3f} MiB on "
                  f"disk, expected {p['expected_bytes'] / 2**20:.3f} MiB (ratio {p['ratio']:.4f}); val_docs ppl "
                  f"{p['ppl_pruned']:.2f} pruned -> {p['ppl_quantized']:.2f} quantized (reloaded in transformers)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
