"""The default prune with its shard surgery beside the re-fit, against the surgery after it.

On the GPU machine, the OLMoE-1B-7B shape (bench/shaped_checkpoints.py) in GPU memory: the
default ``prune --ratio 0.5`` (auto = naee, then the re-fit) timed with its phases
(``scale.phases``) in each arrangement, from a dropped page cache, and the output shards
compared byte for byte:

* ``beside``: as shipped (``surgery.SurgeryAlongside``: the surgery writes in a thread while the
  re-fit runs, each re-fitted layer as soon as it is published, copied to pinned memory);
* ``after``: the surgery once the re-fit is done, in the caller's thread (the arrangement before).

Only the first prune of the process pays the input's NaN/Inf scan (checked once per process).

    python bench/surgery_beside.py --calib .gpu/calib_mix.txt --tokenizer-from .gpu/qwen3moe-32x64-top4 \\
        --json bench/results/surgery_beside_h200.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from scale import drop_cache, phases, timed
    from shaped_checkpoints import make

    import moecompress.surgery as surgery
    from moecompress.prune import prune_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--calib", required=True)
    ap.add_argument("--tokenizer-from", type=Path, required=True)
    ap.add_argument("--variants", default="beside,after")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    src = a.work / "olmoe-1b-7b"
    if not (src / "config.json").exists():
        make("olmoe-1b-7b", src, a.tokenizer_from, "cuda")
        torch.cuda.empty_cache()
    beside = surgery.SurgeryAlongside

    class After(beside):  # the surgery after the re-fit, in this thread
        def __enter__(self):
            return self

        def __exit__(self, exc_type, *exc):
            if exc_type is None:
                self.write()

    names = a.variants.split(",")
    res = {}
    for name in names:
        surgery.SurgeryAlongside = After if name == "after" else beside
        out = a.work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        drop_cache(src)
        with phases() as ph:
            _, t = timed(lambda: prune_checkpoint(src, out, ratio=0.5, calib=a.calib, n=64, seq_len=512,
                                                  dtype="bfloat16", device="cuda", progress=False, overwrite=True))
        res[name] = {"s": round(t, 2), **{k: v["s"] for k, v in ph.report().items()}}
        print(name, json.dumps(res[name]), flush=True)
    surgery.SurgeryAlongside = beside
    first = a.work / f"out_{names[0]}"
    for name in names[1:]:
        files = sorted(p.name for p in first.glob("*.safetensors"))
        res[f"same_bytes_{names[0]}_{name}"] = all(filecmp.cmp(first / f, a.work / f"out_{name}" / f, shallow=False)
                                                   for f in files)
    print("SUMMARY", json.dumps(res), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
