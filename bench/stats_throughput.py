"""Throughput of routing statistics against a plain forward pass on the same tokens.

    python bench/stats_throughput.py                      # CPU, testbed qwen3moe, 64 x 512 calib_mix
    python bench/stats_throughput.py --device cuda        # the GPU goal: stats >= 0.8x plain forward

Three timings over identical batches (median of --repeats after one warm-up each):
  plain  the decoder forward alone (what run_calibration does, without hooks);
  hooks  run_calibration with a no-op observer (capture overhead only);
  stats  collect_stats (every statistic, SRP/SCH finalisation included).
Prints tokens/s and the stats/plain throughput ratio, and how the stats time splits between
the forward+observe pass and the final SRP/SCH/super-expert step; --json writes the numbers.

    python bench/stats_throughput.py --device cuda --synthetic --layers 8
builds a random-weight Qwen3-MoE with Qwen3-30B-A3B's layer shape (hidden 2048, 128 experts,
top-8, expert width 768) instead of loading --model, to see the overhead at realistic size.
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
    ap.add_argument("--synthetic", action="store_true", help="random Qwen3-30B-A3B-shaped model instead of --model")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the --synthetic model")
    a = ap.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    dtype = "float32" if a.dtype == "auto" and a.device == "cpu" else a.dtype
    if a.synthetic:
        model = _synthetic(a.layers, a.device, torch.float32 if dtype == "float32" else torch.bfloat16)
        a.model = f"synthetic Qwen3-MoE, {a.layers} layers, hidden 2048, 128 experts x 768, top-8"
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


def _synthetic(layers: int, device: str, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32,
                               num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                               moe_intermediate_size=768, intermediate_size=6144, vocab_size=32000,
                               norm_topk_prob=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # transformers zero-initialises routers: give them some spread
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.02)
    return model.eval()


if __name__ == "__main__":
    main()
