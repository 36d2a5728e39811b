"""Speed of the block-wise tuning step (``--repair refit+tune``, moecompress/blocktune.py) on one
MoE layer of a published shape, random weights and synthetic pairs: seconds per epoch under
variants of precision (float32, TF32 matmuls, bf16 autocast), the experts' implementation
(transformers' eager loop or grouped_mm) and tokens per step. Quality is not measured here
(random weights): the testbed grid is (bench/prune_quality.py).

  python bench/tune_speed.py --shape olmoe-1b-7b --tokens 131072 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.arch import moe_view  # noqa: E402
from moecompress.blocktune import TunePairs, tune_layer  # noqa: E402
from moecompress.testing import tiny_model  # noqa: E402

SHAPES = {  # one decoder layer of the published model; kept = half of the experts
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, num_experts=64, num_experts_per_tok=8, intermediate_size=1024,
                                  num_attention_heads=16, num_key_value_heads=16)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8,
                                        moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4,
                                        head_dim=128)),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe-1b-7b", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=256 * 512)
    ap.add_argument("--variants", nargs="+", default=["fp32:eager:4096", "tf32:eager:4096", "bf16:eager:4096",
                                                      "bf16:grouped_mm:4096", "bf16:grouped_mm:16384"])
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    family, shape = SHAPES[a.shape]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = tiny_model(family, num_hidden_layers=1, dtype=torch.bfloat16, **shape).to(dev)
    layer = moe_view(model).layers[0]
    layer.keep_experts(list(range(0, layer.num_experts, 2)))
    H = layer.hidden_size
    pairs = TunePairs(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    for i in range(0, a.tokens, 4096):
        x = torch.randn(4096, H, device=dev, generator=gen)
        pairs.add(x, torch.zeros(4096, H, device=dev), torch.randn(4096, H, device=dev, generator=gen) * 0.01)
    rows = []
    for v in a.variants:
        precision, impl, batch = v.split(":")
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        layer.experts.config._experts_implementation = impl
        autocast = torch.bfloat16 if precision == "bf16" else None
        saved = {n: p.detach().clone() for n, p in layer.block.named_parameters()}
        try:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            rec = tune_layer(layer, pairs, epochs=1, lr=1e-4, batch_tokens=int(batch), autocast=autocast)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row = {"variant": v, "s_per_epoch": time.perf_counter() - t, "heldout_loss": rec["heldout_loss"],
                   # a variant listed twice: equal checksums = the same bytes both times (deterministic)
                   "checksum": float(sum(p.double().abs().sum() for p in layer.block.parameters()))}
        except Exception as e:  # a variant the installed versions cannot run: say so, go on
            row = {"variant": v, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        with torch.no_grad():
            for n, p in layer.block.named_parameters():
                p.copy_(saved[n])
        rows.append(row)
        print(json.dumps(row), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    if a.json:
        a.json.write_text(json.dumps({"shape": a.shape, "tokens": a.tokens, "device": str(dev),
                                      "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
