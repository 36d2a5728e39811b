"""Fine-grained pruning in memory vs streamed under a GPU cap: peak GPU memory, time, same output?

Issue 15: HEAPr, MoE-Pruner and STUN (experts, then Wanda) stream layer by layer under
``--max-gpu-memory``. On a random-weight checkpoint of a published shape (``shaped_checkpoints``,
its first ``--layers`` decoder layers), each method runs twice through ``prune_checkpoint``: on the
GPU with the whole model in memory, then streamed under ``--cap``. Per run: wall time,
``torch.cuda.max_memory_allocated``, and whether the written weights equal the in-memory run's
(bytes; else how many tensors differ and by how much: GPU kernels need not round alike).

    python bench/finegrained_stream.py --shape olmoe-1b-7b --layers 4 \\
        --tokenizer-from .gpu/testbed/models/qwen3moe-32x64-top4 --calib .gpu/testbed/text/calib_mix.txt \\
        --json $OUT/finegrained_stream.json

On a machine without a GPU (``--device cpu``, a smoke test) the streamed run uses
``--cpu-cap`` (layers offloaded to disk) instead and no GPU memory is reported.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

METHODS = {"heapr": {"method": "heapr", "ratio": 0.25},
           "moe-pruner": {"method": "moe-pruner", "sparsity": 0.5},
           "stun": {"method": "stun", "ratio": 0.25, "sparsity": 0.5}}


def compare(a: Path, b: Path) -> dict:
    """Equal weights? Bytes first; else per tensor (safetensors files of both folders)."""
    from safetensors import safe_open

    files = sorted(p.name for p in a.glob("*.safetensors"))
    if files == sorted(p.name for p in b.glob("*.safetensors")) and \
            all((a / f).read_bytes() == (b / f).read_bytes() for f in files):
        return {"identical_bytes": True}
    differing, worst, zeros_disagree = 0, 0.0, 0
    for f in files:
        with safe_open(a / f, "pt") as fa, safe_open(b / f, "pt") as fb:
            for k in fa.keys():
                ta, tb = fa.get_tensor(k).float(), fb.get_tensor(k).float()
                if ta.shape != tb.shape or not torch.equal(ta, tb):
                    differing += 1
                    if ta.shape == tb.shape:
                        worst = max(worst, float((ta - tb).abs().max()))
                        zeros_disagree += int(((ta == 0) != (tb == 0)).sum())
    return {"identical_bytes": False, "tensors_differing": differing, "max_abs_diff": worst,
            "pruned_positions_disagreeing": zeros_disagree}


def run(src: Path, out: Path, calib: str, n: int, seq_len: int, batch_size: int, options: dict, **where) -> dict:
    from moecompress.prune import prune_checkpoint

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    result = prune_checkpoint(src, out, calib=calib, n=n, seq_len=seq_len, batch_size=batch_size, progress=False,
                              overwrite=True, **options, **where)
    row = {"s": round(time.perf_counter() - t, 2), "peak_gpu_GiB": None}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        row["peak_gpu_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    report = result.report or {}
    row.update({k: report[k] for k in ("expert_weight_sparsity", "intermediate_size_after") if k in report})
    return row


def main(argv: list[str] | None = None) -> dict:
    from shaped_checkpoints import PUBLISHED, make

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="olmoe-1b-7b", choices=sorted(PUBLISHED))
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the shape to build")
    ap.add_argument("--tokenizer-from", type=Path, required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="both runs (the sums must be formed alike to compare)")
    ap.add_argument("--cap", default="4GiB", help="--max-gpu-memory of the streamed runs")
    ap.add_argument("--cpu-cap", default="40KB", help="--max-cpu-memory of the streamed runs without a GPU")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/finegrained-stream"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    src = a.work / f"{a.shape}-{a.layers}"
    shutil.rmtree(src, ignore_errors=True)
    built = make(a.shape, src, a.tokenizer_from, a.device, layers=a.layers)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    gpu = a.device != "cpu"
    res = {"shape": a.shape, "layers": a.layers, "params": built["params"], "build_s": round(built["seconds"], 1),
           "device": torch.cuda.get_device_name(0) if gpu else "cpu", "n": a.n, "seq_len": a.seq_len, "batch_size": a.batch_size,
           "cap": a.cap if gpu else f"cpu {a.cpu_cap}", "methods": {}}
    streamed = {"max_gpu_memory": a.cap} if gpu else {"max_cpu_memory": a.cpu_cap, "dtype": "float32"}
    for name in a.methods.split(","):
        options = METHODS[name]
        common = (a.calib, a.n, a.seq_len, a.batch_size, options)
        row = {"in_memory": run(src, a.work / "mem", *common, **({"device": a.device} if gpu else {"dtype": "float32"})),
               "streamed": run(src, a.work / "streamed", *common, **streamed)}
        row["same_output"] = compare(a.work / "mem", a.work / "streamed")
        res["methods"][name] = row
        print(name, json.dumps(row), flush=True)
        for d in ("mem", "streamed"):  # disk: the next run needs the room
            shutil.rmtree(a.work / d, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
