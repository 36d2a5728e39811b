"""Throughput of routing statistics against a plain forward pass on the same tokens.

    python bench/stats_throughput.py                      # CPU, testbed qwen3moe, 64 x 512 calib_mix
    python bench/stats_throughput.py --device cuda        # the GPU goal: stats >= 0.8x plain forward

Three timings over identical batches (median of --repeats after one warm-up each):
  plain  the decoder forward alone (what run_calibration does, without hooks);
  hooks  run_calibration with a no-op observer (capture overhead only);
  stats  collect_stats (every statistic, SRP/SCH finalisation included).
Prints tokens/s and the stats/plain throughput ratio, and how the stats time splits between
the forward+observe pass and the final SRP/SCH/super-expert step; --json writes the numbers.

    python bench/stats_throughput.py --device cuda --shape olmoe-1b-7b
builds a random-weight model of a published shape (bench/shaped_checkpoints.py: olmoe-1b-7b,
qwen1.5-moe-a2.7b, deepseek-v2-lite, qwen3-30b-a3b; --layers keeps only the first L decoder
layers) in GPU memory instead of loading --model, to see the overhead at realistic size;
tokens are then random ids. --synthetic is --shape qwen3-30b-a3b --layers 8.
--profile prints the CUDA kernels of one stats run and one plain run, by total time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from moecompress.calibration import load_calibration  # noqa: E402
from moecompress.capture import _decoder, batches_of, run_calibration  # noqa: E402
from moecompress.checkpoint import load_model, resolve_source  # noqa: E402
from moecompress.stats import collect_stats  # noqa: E402

TESTBED = ROOT.parent / "shared" / "testbed"


class _NoOp:
    def observe(self, layer, x, routing, y):
        pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> list[float]:
    fn()  # warm-up (kernels, allocator, caches)
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TESTBED / "models" / "qwen3moe-32x64-top4"))
    ap.add_argument("--calib", default=str(TESTBED / "text" / "calib_mix.txt"))
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--segment-len", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto: float32 on CPU, the checkpoint's dtype on GPU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--synthetic", action="store_true", help="same as --shape qwen3-30b-a3b --layers 8")
    ap.add_argument("--shape", default=None, help="random-weight model of this published shape instead of --model")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the --shape model (default: all)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of stats and plain")
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    dtype = "float32" if a.dtype == "auto" and a.device == "cpu" else a.dtype
    if a.synthetic:
        a.shape, a.layers = "qwen3-30b-a3b", a.layers or 8
    if a.shape:
        model = _shaped(a.shape, a.layers, a.device, torch.float32 if dtype == "float32" else torch.bfloat16)
        a.model = f"random-weight {a.shape}, {model.config.num_hidden_layers} layers"
        tokens = torch.randint(0, model.config.vocab_size, (a.n, a.seq_len), generator=torch.Generator().manual_seed(0))
    else:
        model = load_model(a.model, dtype=dtype, device=None if a.device == "cpu" else a.device)
        tok = AutoTokenizer.from_pretrained(resolve_source(a.model))
        tokens = load_calibration(tok, a.calib, n=a.n, seq_len=a.seq_len, seed=0)
    dev_tokens = tokens.to(a.device)

    @torch.no_grad()
    def plain():
        for chunk in batches_of(dev_tokens, a.batch_size):
            _decoder(model)(input_ids=chunk, use_cache=False)

    def hooks():
        run_calibration(model, tokens, [_NoOp()], batch_size=a.batch_size, progress=False)

    result, split = {}, []

    def stats():
        t: dict = {}
        result["stats"] = collect_stats(model, tokens, batch_size=a.batch_size, segment_len=a.segment_len, progress=False,
                                        timings=t)
        split.append(t)

    times = {name: _timed(fn, a.device, a.repeats) for name, fn in (("plain", plain), ("hooks", hooks), ("stats", stats))}
    if a.profile and a.device.startswith("cuda"):
        _profile(stats, "stats")
        _profile(plain, "plain")
    s = result["stats"]
    k = s.meta["top_k"]
    assert all(int(s.get(li, "count").sum()) == tokens.numel() * k for li in s.layers), "counts must sum to tokens x top-k"

    ntok = tokens.numel()
    med = {n: statistics.median(t) for n, t in times.items()}
    tps = {n: ntok / t for n, t in med.items()}
    device_name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"model {a.model}  tokens {a.n} x {a.seq_len} = {ntok}  batch {a.batch_size}  device {a.device} ({device_name})  "
          f"dtype {next(model.parameters()).dtype}  threads {torch.get_num_threads()}")
    for n in ("plain", "hooks", "stats"):
        print(f"  {n:6s} {med[n]:8.3f} s   {tps[n]:10.0f} tokens/s   (runs: {', '.join(f'{t:.3f}' for t in times[n])})")
    ratio = tps["stats"] / tps["plain"]
    fo = statistics.median(t["forward_observe"] for t in split[1:] or split)
    fin = statistics.median(t["finalize"] for t in split[1:] or split)
    print(f"  stats split: forward+observe {fo:.3f} s, finalize (SRP/SCH/super experts) {fin:.3f} s")
    print(f"  stats / plain throughput: {ratio:.2f}x (goal on GPU >= 0.8x); without finalize {med['plain'] / fo:.2f}x")
    if a.json:
        a.json.write_text(json.dumps({
            "model": a.model, "calib": a.calib, "n": a.n, "seq_len": a.seq_len, "batch_size": a.batch_size,
            "device": a.device, "device_name": device_name, "dtype": str(next(model.parameters()).dtype),
            "threads": torch.get_num_threads(), "seconds": times, "median_seconds": med, "tokens_per_s": tps,
            "stats_over_plain": ratio, "forward_observe_s": fo, "finalize_s": fin, "torch": torch.__version__,
        }, indent=2) + "\n")


def _shaped(name: str, layers: int | None, device: str, dtype):
    """Random-weight model of a published shape, built directly in ``device`` memory."""
    from shaped_checkpoints import PUBLISHED
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(PUBLISHED[name])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # as bench/shaped_checkpoints.py (transformers zero-initialises routers)
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


def _profile(fn, label: str, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    print(f"--- profile: {label} ---")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
