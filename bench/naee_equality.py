"""NAEE before/after a change: kept sets, scores, record and written bytes on the testbed.

Runs ``prune_checkpoint(..., method="naee")`` (what ``moecompress prune`` runs) on the testbed
models at the given kept counts (CPU, calib_mix.txt, 64 x 512 tokens, seed 0) and records,
per run, the kept experts, the per-expert scores (full precision), NAEE's per-layer record
and the SHA-256 of every written file. ``--compare`` checks a new run against a recorded one:
kept sets and safetensors bytes must be equal; scores and relative errors are reported as the
largest relative difference.

  python bench/naee_equality.py --json before.json                 # record
  python bench/naee_equality.py --json after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.prune import prune_checkpoint  # noqa: E402

TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbed"
RUNS = {"qwen3moe-32x64-top4": (24, 16, 8), "mixtral-8x256-top2": (4, 2)}


def run(src: Path, calib: Path, keep: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned"
        start = time.perf_counter()
        res = prune_checkpoint(src, out, keep=keep, method="naee", calib=str(calib), n=64, seq_len=512, seed=0,
                               progress=False)
        seconds = time.perf_counter() - start
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}
    return {"kept": {str(k): v for k, v in res.kept.items()}, "scores": {str(k): v for k, v in res.scores.items()},
            "layers": {str(k): v for k, v in res.info["layers"].items()}, "sha256": files,
            "seconds": round(seconds, 1)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def compare(old: dict, new: dict) -> dict:
    """Equal kept sets and tensors bytes; largest relative difference of scores and errors."""
    score_rel = max((_rel(a, b) for li in old["scores"] for a, b in zip(old["scores"][li], new["scores"][li])),
                    default=0.0)
    err_rel = max(_rel(old["layers"][li]["relative_error"], new["layers"][li]["relative_error"]) for li in old["layers"])
    tensors = [n for n in old["sha256"] if n.endswith(".safetensors")]
    return {"kept_equal": old["kept"] == new["kept"],
            "safetensors_equal": all(old["sha256"][n] == new["sha256"].get(n) for n in tensors),
            "files_differing": sorted(n for n in old["sha256"] if old["sha256"][n] != new["sha256"].get(n)),
            "evaluated_sets_equal": all(old["layers"][li]["evaluated_sets"] == new["layers"][li]["evaluated_sets"]
                                        for li in old["layers"]),
            "max_score_rel_diff": score_rel, "max_relative_error_rel_diff": err_rel,
            "seconds": [old["seconds"], new["seconds"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", default=str(TESTBED))
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--compare", type=Path)
    ap.add_argument("--only", nargs="*", default=[], help="MODEL=K (default: all runs)")
    a = ap.parse_args()
    tb = Path(a.testbed)
    runs = [(m, k) for m, ks in RUNS.items() for k in ks]
    if a.only:
        runs = [(i.partition("=")[0], int(i.partition("=")[2])) for i in a.only]
    old = json.loads(a.compare.read_text()) if a.compare else None
    out = {}
    for name, keep in runs:
        key = f"{name}@{keep}"
        out[key] = run(tb / "models" / name, tb / "text" / "calib_mix.txt", keep)
        line = {"run": key, "seconds": out[key]["seconds"]}
        if old is not None and key in old:
            out[key]["compare"] = line["compare"] = compare(old[key], out[key])
        print(json.dumps(line), flush=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
