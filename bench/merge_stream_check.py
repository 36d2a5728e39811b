"""Peak GPU memory of a streamed merge (`merge --max-gpu-memory`), on a random-weight model of
a published shape with its first few layers (issue 8).

    python bench/merge_stream_check.py --shape olmoe-1b-7b --layers 4 --tokenizer-from <testbed qwen3moe> \
        --calib calib_mix.txt --json bench/results/merge_olmoe4_stream_h100.json

Builds the model on the GPU, saves it to --work, then merges it to half its experts (m-smoe +
re-fit) with ``max_gpu_memory=--cap``; prints and writes the wall time and
``torch.cuda.max_memory_allocated``. ``--unbounded`` also runs it first with every layer's
re-fit accumulators at once and no working-set reservation (the code before the fix), in a
separate process state only as far as ``gc.collect()`` frees the first model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    from shaped_checkpoints import PUBLISHED
    from transformers import AutoConfig, AutoModelForCausalLM

    from moecompress import refit
    from moecompress.merge.checkpoint import merge_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="olmoe-1b-7b", choices=sorted(PUBLISHED))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokenizer-from", type=Path, required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--cap", default="4GiB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/merge-stream"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--unbounded", action="store_true", help="also measure without the working-set reservation")
    ap.add_argument("--profile", type=Path, help="write the 40 costliest functions (cProfile, cumulative) here")
    ap.add_argument("--src", type=Path, help="an existing checkpoint of the shape (e.g. bench/scale.py's) instead of a new one")
    a = ap.parse_args()

    kw = dict(PUBLISHED[a.shape])
    kw["num_hidden_layers"] = a.layers
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    src = a.src or a.work / a.shape
    if a.src is None:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        with torch.no_grad():  # as shaped_checkpoints.py
            for p in model.parameters():
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        model.save_pretrained(src, max_shard_size="2GB")
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(a.tokenizer_from / f, src / f)
        del model
        torch.cuda.empty_cache()
    else:
        cfg = AutoConfig.from_pretrained(src)
        a.layers = cfg.num_hidden_layers
    keep = cfg.num_experts // 2 if hasattr(cfg, "num_experts") else cfg.n_routed_experts // 2

    res = {"shape": a.shape, "layers": a.layers, "device": torch.cuda.get_device_name(0), "cap": a.cap, "n": a.n, "keep": keep}
    import gc

    from moecompress.merge import checkpoint as merge_api

    runs = [("bounded", None)]
    if a.unbounded:
        runs.insert(0, ("unbounded", 1 << 62))
    default_budget, working = refit.ACCUMULATOR_BUDGET, merge_api.streamed_working_bytes
    for label, budget in runs:
        refit.ACCUMULATOR_BUDGET = budget or default_budget
        merge_api.streamed_working_bytes = (lambda *args, **kw: 0) if budget else working
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        prof = None
        if a.profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        merge_checkpoint(src, a.work / f"merged-{label}", keep=keep, calib=a.calib, n=a.n, seq_len=512,
                         dtype="bfloat16", max_gpu_memory=a.cap, max_cpu_memory="16GiB", progress=False, overwrite=True)
        if prof is not None:
            import io
            import pstats

            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
            a.profile.write_text(buf.getvalue())
        res[label] = {"s": time.perf_counter() - t, "peak_gpu_GiB": torch.cuda.max_memory_allocated() / 2**30}
        shutil.rmtree(a.work / f"merged-{label}", ignore_errors=True)  # disk: the next run needs the room
        print(label, res[label], flush=True)
    refit.ACCUMULATOR_BUDGET, merge_api.streamed_working_bytes = default_budget, working
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
