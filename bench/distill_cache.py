"""What `moecompress distill --cache-teacher` saves and costs, on the testbed.

  python bench/distill_cache.py [--model DIR] [--student DIR] [--data FILE] [--work DIR]
      [--device cpu|cuda] [--run NAME JSON ...] [--json OUT]

For every ``--run NAME JSON`` (``distill_checkpoint`` options; default 20 steps, seq 256,
batch 4, lr 3e-4, top-8 logits) three distillations of ``--student`` (default: the one-shot
16/32 cut of ``--model``, pruned like bench/distill_quality.py, cached in ``--work``) from
``--model`` run, each in its own process so that peak memory
is its own: ``live`` (teacher in memory, the default), ``cold`` (``--cache-teacher`` with an
empty cache: the teacher runs once, its records go to disk, training reads them) and ``warm``
(the same command again: the cache is reused, the teacher is never loaded). Reported: training
seconds and tokens/s, the cache build seconds, the cache's size on disk, peak memory (GPU:
``torch.cuda.max_memory_allocated``; CPU: the process's max RSS), and whether ``cold`` and
``warm`` wrote the ``live`` run's exact ``model.safetensors`` bytes and loss curve (and the
largest loss difference). The three checkpoints are deleted after each run (disk).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TESTBED = next((p / "shared" / "testbed" for p in Path(__file__).resolve().parents[1:4]
                if (p / "shared" / "testbed").is_dir()), Path("../shared/testbed"))
DEFAULT_RUN = {"steps": 20, "seq_len": 256, "batch_size": 4, "lr": 3e-4, "top_k_logits": 8}


def child(spec: dict) -> None:
    """One distillation; prints its figures as one JSON line."""
    import torch

    from moecompress.distill import distill_checkpoint

    t = time.perf_counter()
    r = distill_checkpoint(spec["student"], spec["out"], teacher=spec["teacher"], data=spec["data"], overwrite=True,
                           cpu=spec["device"] == "cpu", progress=False, **spec["options"])
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() and spec["device"] != "cpu"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"wall_seconds": round(time.perf_counter() - t, 2), "train_seconds": r.seconds,
                      "tokens": r.tokens, "tokens_per_s": round(r.tokens_per_s), "loss_last": r.last_loss,
                      "peak_memory_mib": round(peak / 2**20), "teacher_cache": r.teacher_cache}))


def _curve(folder: Path) -> list:
    keys = ("step", "loss", "kl", "hidden", "ce", "lr")  # not the timing fields
    return [[r[k] for k in keys] for r in json.loads((folder / "loss_curve.json").read_text())["steps"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(TESTBED / "models" / "qwen3moe-32x64-top4"))
    ap.add_argument("--student", help="the student checkpoint (default: prune --model to 16 experts)")
    ap.add_argument("--data", default=str(TESTBED / "text" / "calib_mix.txt"))
    ap.add_argument("--work", default="/tmp/distill-cache-bench")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--run", nargs=2, action="append", metavar=("NAME", "JSON"))
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))
    from moecompress.prune import prune_checkpoint

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    student = Path(a.student) if a.student else work / "oneshot16"
    if not student.exists():  # the one-shot cut of bench/distill_quality.py
        prune_checkpoint(a.model, student, keep=16, calib=a.data, n=64, seq_len=512,
                         device=a.device if a.device != "cpu" else None, progress=False)
    result = {"model": a.model, "data": a.data, "device": a.device, "runs": []}
    for name, text in a.run or [["top8", json.dumps(DEFAULT_RUN)]]:
        opts = {**DEFAULT_RUN, **json.loads(text)}
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"name": name, "options": opts}
        for mode in ("live", "cold", "warm"):
            o = {**opts, **({"cache_teacher": True, "teacher_cache_dir": str(cache)} if mode != "live" else {})}
            spec = {"student": str(student), "teacher": a.model, "data": a.data, "device": a.device,
                    "out": str(work / f"{name}-{mode}"), "options": o}
            p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
            if p.returncode:
                row[mode] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                row[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        live = work / f"{name}-live"
        for mode in ("cold", "warm"):
            out = work / f"{name}-{mode}"
            if "error" not in row[mode]:
                row[mode]["same_bytes_as_live"] = ((out / "model.safetensors").read_bytes() ==
                                                   (live / "model.safetensors").read_bytes())
                row[mode]["same_loss_curve_as_live"] = _curve(out) == _curve(live)
                row[mode]["max_loss_diff"] = max(abs(x[1] - y[1]) for x, y in zip(_curve(out), _curve(live)))
        for mode in ("live", "cold", "warm"):
            shutil.rmtree(work / f"{name}-{mode}", ignore_errors=True)
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
