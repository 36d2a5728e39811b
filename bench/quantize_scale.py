"""GPTQ W4A16 of a published MoE shape on one GPU: time and peak memory against the prune floor.

Runs on the GPU machine against a random-weight checkpoint of the shape (bench/shaped_checkpoints.py),
like bench/scale.py, whose rates and floor it reuses:

  floor = input bytes / read rate + output bytes / write rate + forward FLOPs / matmul rate

(read/write rates measured in the same run, page cache dropped before timed reads). Measured:
``prune --ratio 0.5 --method frequency`` (the floor's reference run) and
``quantize --scheme w4a16 --quantizer gptq --group-size 128`` (calibration 64 x 512), both
end to end from the folder, with the peak GPU memory of each.

    python bench/quantize_scale.py olmoe-1b-7b --work /tmp/qscale --calib ../testbed/calib_mix.txt \
        --tokenizer-from ../testbed/qwen3moe-32x64-top4 --json $OUT/quantize_scale.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scale import folder_bytes, matmul_rate, peak_gpu_gib, read_rate, timed, write_rate  # noqa: E402


def main() -> None:
    from shaped_checkpoints import make

    from moecompress.info import model_info
    from moecompress.prune import prune_checkpoint
    from moecompress.quantize import quantize_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--work", type=Path, default=Path("/tmp/qscale"))
    ap.add_argument("--calib", required=True)
    ap.add_argument("--tokenizer-from", type=Path, required=True)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--skip-prune", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src, outs = a.work / a.name, a.work / "out"
    outs.mkdir(parents=True, exist_ok=True)
    res: dict = {"shape": a.name, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}
    if not (src / "config.json").exists():
        res["generate"] = make(a.name, src, a.tokenizer_from, dev)
    info = model_info(src)
    res.update(total_params=info["total_params"], active_params=info["active_params"], input_bytes=folder_bytes(src),
               read_Bps=read_rate(src), matmul_flops=matmul_rate(dev))
    res["write_Bps"] = write_rate(outs / "probe", res["input_bytes"] // 2)
    ntok = a.n * a.seq_len
    fwd_flops = 2 * info["active_params"] * ntok
    common = dict(calib=a.calib, n=a.n, seq_len=a.seq_len, device=dev, progress=False, overwrite=True)

    if not a.skip_prune:
        torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
        _, t = timed(lambda: prune_checkpoint(src, outs / "pruned", ratio=0.5, method="frequency", **common))
        out_bytes = folder_bytes(outs / "pruned")
        floor = res["input_bytes"] / res["read_Bps"] + out_bytes / res["write_Bps"] + fwd_flops / res["matmul_flops"]
        res.update(prune_s=t, prune_floor_s=floor, prune_vs_floor=t / floor, prune_peak_gpu_GiB=peak_gpu_gib())
        shutil.rmtree(outs / "pruned", ignore_errors=True)
        print(json.dumps(res, indent=1), flush=True)

    torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
    q, t = timed(lambda: quantize_checkpoint(src, outs / "w4a16", scheme="w4a16", quantizer="gptq",
                                             group_size=a.group_size, **common))
    out_bytes = folder_bytes(outs / "w4a16")
    floor = res["input_bytes"] / res["read_Bps"] + out_bytes / res["write_Bps"] + fwd_flops / res["matmul_flops"]
    res.update(quantize_s=t, quantize_floor_s=floor, quantize_vs_floor=t / floor,
               quantize_vs_prune_floor=t / res.get("prune_floor_s", floor), quantize_peak_gpu_GiB=peak_gpu_gib(),
               output_bytes=out_bytes, average_bits=q.average_bits, fallbacks=len(q.fallbacks))
    shutil.rmtree(outs / "w4a16", ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
