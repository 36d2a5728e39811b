"""Quality of expert quantization on the testbed: scheme x bits x quantizer x allocation.

Each run is what a user types (``quantize_checkpoint``, i.e. ``moecompress quantize``): load,
calibrate on 64 x 512 tokens of calib_mix.txt drawn with the seed, quantize the experts only
(attention / LM head untouched), group size 64, write the checkpoint; the SAVED checkpoint is
reloaded with stock ``from_pretrained`` in float32 and its perplexity measured on the first 20k
tokens of val_docs.txt (non-overlapping 512-token windows, the testbed's reference method).
Every figure is the mean over calibration seeds 0, 1, 2 (RTN uniform needs no calibration: once).
Everything (quantization and evaluation) computes in float32, on ``--device``.

Research allocations (per-expert widths, 2-3 bits) are written in the ``fake`` format (dequantized
weights + bit map); uniform 4/8-bit runs in ``compressed-tensors`` (their bytes on disk are real).
"bits" is the honest average per expert weight: weights + one bf16 scale per 64 weights.

The default runs are issue 13's acceptance table (both models; GPTQ 4-bit; uniform 3, mc-moe /
mc-moe-paper / random at 3.0; mc-moe / mc-moe-paper / frequency-only at 2.5; seeds 0 1 2):

  python bench/quantize_quality.py [--testbed DIR] [--device cpu|cuda] [--jobs N] [--models ...]
      [--seeds 0 1 2] [--runs NAME ...] [--pipeline] [--json OUT] [--markdown OUT] [--docs docs/benchmarks.md]
  python bench/quantize_quality.py --from-json OUT.json --docs docs/benchmarks.md   # re-render only

``--testbed``: a folder with ``models/<name>`` and ``text/*.txt`` (/work/shared/testbed here,
.gpu/testbed on the GPU machine). ``--jobs N`` runs N cells (model x run x seed) in parallel
processes. ``--docs FILE`` writes the markdown table into FILE between the markers
``<!-- quantize-table:begin -->`` and ``<!-- quantize-table:end -->``.
``--pipeline``: ``prune --keep 24`` then ``quantize --format compressed-tensors --scheme w4a16`` on
qwen3moe; size on disk against the expected (4 bits + scales for the experts, the rest as stored)
and a reload in transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.checkpoint import cast_floating_weights  # noqa: E402
from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.quantize import quantize_checkpoint  # noqa: E402

TESTBED = Path("/work/shared/testbed") if Path("/work/shared/testbed").exists() else Path(__file__).resolve().parents[2] / "shared" / "testbed"
GROUP = 64
BEGIN, END = "<!-- quantize-table:begin -->", "<!-- quantize-table:end -->"
# name -> (options, seeded); candidates 2,3,4 for the mixed-precision comparisons (the issue's)
MIX = dict(candidates=[2, 3, 4], quantizer="gptq", format="fake")
RUNS = {
    "rtn-w4": (dict(quantizer="rtn", scheme="w4a16"), False),
    "gptq-w4": (dict(quantizer="gptq", scheme="w4a16"), True),
    "gptq-w8": (dict(quantizer="gptq", scheme="w8a16"), True),
    "rtn-uniform-3": (dict(quantizer="rtn", bits=3, format="fake"), False),
    "gptq-uniform-3": (dict(quantizer="gptq", bits=3, format="fake"), True),
    "mc-moe-expert-3.0": (dict(MIX, granularity="expert", bits=3.0), True),
    "mc-moe-paper-expert-3.0": (dict(MIX, granularity="expert", bits=3.0, allocation="mc-moe-paper"), True),
    "random-expert-3.0": (dict(MIX, granularity="expert", bits=3.0, allocation="random"), True),
    "frequency-expert-3.0": (dict(MIX, granularity="expert", bits=3.0, allocation="frequency"), True),
    "mc-moe-layer-3.0": (dict(MIX, granularity="layer", bits=3.0), True),
    "mc-moe-expert-2.5": (dict(MIX, granularity="expert", bits=2.5), True),
    "mc-moe-paper-expert-2.5": (dict(MIX, granularity="expert", bits=2.5, allocation="mc-moe-paper"), True),
    "frequency-expert-2.5": (dict(MIX, granularity="expert", bits=2.5, allocation="frequency"), True),
    "gptq-uniform-2": (dict(quantizer="gptq", bits=2, format="fake"), True),
}
ACCEPTANCE = ["gptq-w4", "gptq-uniform-3", "mc-moe-expert-3.0", "mc-moe-paper-expert-3.0", "random-expert-3.0",
              "mc-moe-expert-2.5", "mc-moe-paper-expert-2.5", "frequency-expert-2.5"]
MODELS = ["qwen3moe-32x64-top4", "mixtral-8x256-top2"]


def ppl(folder: Path, ids: torch.Tensor, device: str = "cpu") -> float:
    # transformers decompresses a compressed-tensors checkpoint's fused experts in the scales'
    # dtype (bf16) even when float32 is asked; left so, the experts compute in bf16 on the CPU
    # and a GPU refuses the mixed product (and transformers refuses .float() on it)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cast_floating_weights(model, torch.float32)
    model = model.to(device).eval()
    return perplexity(model, ids, 512)["ppl"]


@lru_cache(maxsize=None)
def val_ids(testbed: str, name: str) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(Path(testbed) / "models" / name)
    return load_text_tokens(tok, Path(testbed) / "text" / "val_docs.txt", 20_000)


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_one(src: Path, calib: Path, ids, opts: dict, seed: int, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        start = time.perf_counter()
        res = quantize_checkpoint(src, out, calib=str(calib), n=64, seq_len=512, seed=seed, group_size=GROUP,
                                  progress=False, device=device, dtype="float32", **opts)
        seconds = time.perf_counter() - start
        return {"ppl": ppl(out, ids, device), "seconds": seconds, "bits": res.average_bits, "width": res.average_width,
                "expert_bytes": res.total_bits / 8, "disk_bytes": disk_bytes(out), "fallbacks": len(res.fallbacks),
                "widths": {str(k): v for k, v in res.widths.items()} if opts.get("granularity") == "expert"
                else {str(k): v[0] for k, v in res.widths.items()}}


def _cell(testbed: str, name: str, run: str, seed: int, device: str, threads: int) -> dict:
    """One model x run x seed (a worker process's unit of work)."""
    torch.set_num_threads(threads)
    tb = Path(testbed)
    if run == "base":
        src = tb / "models" / name
        return {"ppl": ppl(src, val_ids(testbed, name), device), "disk_bytes": disk_bytes(src)}
    return run_one(tb / "models" / name, tb / "text" / "calib_mix.txt", val_ids(testbed, name), RUNS[run][0], seed,
                   device)


def pipeline(tb: Path, ids, device: str = "cpu") -> dict:
    """prune (naee, keep 24) && quantize (compressed-tensors w4a16, group 64): size and reload."""
    from safetensors import safe_open

    from moecompress.prune import prune_checkpoint

    src, calib = tb / "models" / "qwen3moe-32x64-top4", tb / "text" / "calib_mix.txt"
    with tempfile.TemporaryDirectory() as tmp:
        pruned, quant = Path(tmp) / "pruned", Path(tmp) / "w4"
        prune_checkpoint(src, pruned, keep=24, calib=str(calib), progress=False, device=device)
        res = quantize_checkpoint(pruned, quant, scheme="w4a16", quantizer="gptq", group_size=GROUP, calib=str(calib),
                                  progress=False, device=device, dtype="float32")
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
                "ratio": actual / expected, "ppl_pruned": ppl(pruned, ids, device),
                "ppl_quantized": ppl(quant, ids, device),
                "bits": res.average_bits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(TESTBED), help="folder with models/<name> and text/*.txt")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--jobs", type=int, default=1, help="cells (model x run x seed) run in parallel processes")
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--runs", nargs="+", default=ACCEPTANCE, choices=list(RUNS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--pipeline", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--docs", type=Path, help=f"write the table into this file between {BEGIN} and {END}")
    ap.add_argument("--from-json", type=Path, help="render a saved --json result instead of running")
    a = ap.parse_args()
    if a.from_json:
        out = json.loads(a.from_json.read_text())
    else:
        out = measure(a)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    if a.markdown:
        a.markdown.write_text(text)
    if a.docs:
        into_docs(a.docs, text)
    print(text)


def measure(a) -> dict:
    start = time.perf_counter()
    cells = [(name, "base", 0) for name in a.models]
    cells += [(name, run, s) for name in a.models for run in a.runs for s in (a.seeds if RUNS[run][1] else a.seeds[:1])]
    threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else torch.get_num_threads()
    args = [(a.testbed, name, run, s, a.device, threads) for name, run, s in cells]
    got = {}

    def show(cell, res):
        got[cell] = res
        print(f"[{len(got)}/{len(cells)} {time.perf_counter() - start:.0f} s] {' '.join(map(str, cell))}: "
              f"ppl {res['ppl']:.3f}", flush=True)

    if a.jobs > 1:  # spawn: CUDA cannot be used in forked children
        with ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_cell, *x): cell for cell, x in zip(cells, args)}
            for f in as_completed(futures):
                show(futures[f], f.result())
    else:
        for cell, x in zip(cells, args):
            show(cell, _cell(*x))
    out: dict = {"rows": [], "pipeline": None, "device": a.device, "seeds": a.seeds,
                 "torch": torch.__version__, "testbed": a.testbed}
    for name in a.models:
        out["rows"].append({"model": name, "run": "base", **got[(name, "base", 0)]})
        for run in a.runs:
            opts, seeded = RUNS[run]
            seeds = a.seeds if seeded else a.seeds[:1]
            per = [got[(name, run, s)] for s in seeds]
            out["rows"].append({"model": name, "run": run, "options": opts, "seeds": seeds,
                                "ppl": statistics.mean(p["ppl"] for p in per), "ppl_each": [p["ppl"] for p in per],
                                **{k: per[0][k] for k in ("bits", "width", "expert_bytes", "disk_bytes")},
                                "seconds": statistics.mean(p["seconds"] for p in per),
                                "fallbacks": [p["fallbacks"] for p in per], "widths": [p["widths"] for p in per]})
            print(json.dumps({k: v for k, v in out["rows"][-1].items() if k != "widths"}), flush=True)
    if a.pipeline:
        tb = Path(a.testbed)
        out["pipeline"] = pipeline(tb, val_ids(a.testbed, "qwen3moe-32x64-top4"), a.device)
        print(json.dumps(out["pipeline"]), flush=True)
    out["wall_seconds"] = round(time.perf_counter() - start, 1)
    return out


LABELS = {"gptq-w4": "GPTQ 4-bit (w4a16)", "gptq-uniform-3": "GPTQ uniform 3", "rtn-w4": "RTN 4-bit (w4a16)",
          "rtn-uniform-3": "RTN uniform 3"}
# acceptance (issue 13): (what, run, must be below run or a number)
CHECKS = [("GPTQ 4-bit <= 12.80 (qwen3moe)", "gptq-w4", 12.80),
          ("mc-moe 3.0 beats uniform 3", "mc-moe-expert-3.0", "gptq-uniform-3"),
          ("mc-moe 3.0 beats random 3.0", "mc-moe-expert-3.0", "random-expert-3.0"),
          ("mc-moe 2.5 beats frequency-only 2.5", "mc-moe-expert-2.5", "frequency-expert-2.5"),
          ("mc-moe-paper 3.0 beats uniform 3", "mc-moe-paper-expert-3.0", "gptq-uniform-3"),
          ("mc-moe-paper 2.5 beats frequency-only 2.5", "mc-moe-paper-expert-2.5", "frequency-expert-2.5")]


def markdown(out: dict) -> str:
    seeds = out.get("seeds", [0, 1, 2])
    lines = [f"Device: {out.get('device', 'cpu')} (torch {out.get('torch', '?')}), seeds {' '.join(map(str, seeds))}; "
             f"wall time {out.get('wall_seconds', '?')} s.", ""]
    for name in dict.fromkeys(r["model"] for r in out["rows"]):
        rows = [r for r in out["rows"] if r["model"] == name]
        base = rows[0]
        by_run = {r["run"]: r for r in rows[1:]}
        lines += [f"**{name}** (base: val_docs {base['ppl']:.2f}, {base['disk_bytes'] / 2**20:.2f} MiB on disk)", "",
                  "| run | format | quantizer | allocation | avg width | bits/weight (honest) | expert MiB | MiB on disk "
                  "| val_docs ppl (mean of seeds) | per seed |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows[1:]:
            o = r["options"]
            alloc = (o.get("allocation", "mc-moe") + f" / {o['granularity']}") if o.get("granularity") else "uniform"
            lines.append(f"| {LABELS.get(r['run'], r['run'])} | {o.get('format', 'compressed-tensors')} | "
                         f"{o['quantizer']} | {alloc} | {r['width']:.2f} | {r['bits']:.3f} | "
                         f"{r['expert_bytes'] / 2**20:.2f} | {r['disk_bytes'] / 2**20:.2f} | {r['ppl']:.2f} | "
                         + " / ".join(f"{p:.2f}" for p in r["ppl_each"]) + " |")
        checks = []
        for what, run, other in CHECKS:
            if run not in by_run or (isinstance(other, str) and other not in by_run):
                continue
            if isinstance(other, float) and not name.startswith("qwen3moe"):
                continue
            ref = other if isinstance(other, float) else by_run[other]["ppl"]
            ok = by_run[run]["ppl"] < ref if isinstance(other, str) else by_run[run]["ppl"] <= ref
            checks.append(f"{what}: **{'yes' if ok else 'no'}** ({by_run[run]['ppl']:.3f} vs {ref:.3f})")
        if checks:
            lines += ["", "Acceptance: " + "; ".join(checks) + "."]
        lines.append("")
    p = out.get("pipeline")
    if p:
        lines += [f"prune --keep 24 && quantize --scheme w4a16 (qwen3moe): {p['quantized_bytes'] / 2**20:.3f} MiB on "
                  f"disk, expected {p['expected_bytes'] / 2**20:.3f} MiB (ratio {p['ratio']:.4f}); val_docs ppl "
                  f"{p['ppl_pruned']:.2f} pruned -> {p['ppl_quantized']:.2f} quantized (reloaded in transformers)", ""]
    return "\n".join(lines)


def into_docs(path: Path, table: str) -> None:
    """Replace what stands between the markers in ``path`` with ``table``."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table.rstrip()}\n{END}{tail}")


if __name__ == "__main__":
    main()
