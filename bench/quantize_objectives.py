"""Allocation objectives compared on one cheap setting: round-to-nearest weights, one seed.

The allocation statistics (frequency, activation weight, MC-MoE's output loss eps_{i,b} per expert
and width, and the squared weight error) are measured once on 64 x 512 calibration tokens of
calib_mix.txt; every expert is rounded to nearest once per candidate width (2, 3, 4; symmetric,
group 64, bf16 scales); then each objective's integer program (one budget per layer, as MC-MoE)
picks the widths, the model takes those RTN weights, and its val_docs perplexity (first 20k tokens,
512-token windows) is measured. No GPTQ and no checkpoint written: this settles which objective
to try in bench/quantize_quality.py, it is not the acceptance figure.

  python bench/quantize_objectives.py mixtral-8x256-top2 --seed 0 [--testbed DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress.arch import moe_view  # noqa: E402
from moecompress.calibration import load_calibration  # noqa: E402
from moecompress.capture import LayerCursor  # noqa: E402
from moecompress.evaluate.perplexity import load_text_tokens, perplexity  # noqa: E402
from moecompress.quantize import allocate  # noqa: E402
from moecompress.quantize.experts import PARTS, ExpertTraffic, output_loss, quantize_experts  # noqa: E402
from moecompress.quantize.grid import matrix_bits  # noqa: E402

CANDS, GROUP, LOSS_TOKENS = [2, 3, 4], 64, 8192


def imp(s, a, b):
    return allocate.importance(s["freq"], s["weight"], a, b)[:, None]


OBJECTIVES = {
    "mc-moe-paper: phi w^1.5 eps": lambda s: allocate.allocation_cost("mc-moe-paper", s["eps"], s["freq"], s["weight"], 1, 1.5),
    "frequency-only: phi x mean eps": lambda s: allocate.allocation_cost("frequency", s["eps"], s["freq"], s["weight"], 1, 1.5),
    "mc-moe: eps^2": lambda s: allocate.allocation_cost("mc-moe", s["eps"], s["freq"], s["weight"], 1, 1.5),
    "eps (no square, no importance)": lambda s: s["eps"],
    "phi x weight error": lambda s: imp(s, 1, 0) * s["werr"],
}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--testbed", default="/work/shared/testbed")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    tb = Path(a.testbed)
    src = tb / "models" / a.model
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = load_text_tokens(tok, tb / "text" / "val_docs.txt", 20_000)
    calib = load_calibration(tok, tb / "text" / "calib_mix.txt", n=64, seq_len=512, seed=a.seed)
    view = moe_view(model)
    kw = dict(quantizer="rtn", group_size=GROUP, symmetric=True, store_dtype=torch.bfloat16, damp=0.01, min_tokens=0)
    cursor = LayerCursor(model, calib, batch_size=8, view=view)
    stats, rounded = {}, {}
    for layer in view:
        li, E = layer.layer_idx, layer.num_experts
        traffic = ExpertTraffic(layer, hessians=False, sample_tokens=LOSS_TOKENS,
                                sample_per_batch=-(-LOSS_TOKENS // len(cursor.hidden)), seed=a.seed * 1_000_003 + li)
        cursor.advance(li, [traffic])
        eps, werr = np.zeros((E, len(CANDS))), np.zeros((E, len(CANDS)))
        rounded[li] = {}
        for j, b in enumerate(CANDS):
            qs = quantize_experts(layer, dict.fromkeys(range(E), b), traffic, **kw)
            rounded[li][b] = {e: q.weights for e, q in qs.items()}
            for e, q in qs.items():
                eps[e, j] = output_loss(layer, e, traffic, q.weights)
                werr[e, j] = sum(float((q.weights[p] - getattr(layer, f"{p}_proj")[e]).double().square().sum())
                                 for p in PARTS)
        stats[li] = dict(freq=traffic.freq.numpy(), weight=traffic.weight.numpy(), eps=eps, werr=werr)
    layers = {layer.layer_idx: layer for layer in view}
    shapes = {p: tuple(getattr(view.layers[0], f"{p}_proj").shape[1:]) for p in PARTS}

    def size_of(b):
        return sum(matrix_bits(shapes[p], b, GROUP, True, 16) for p in PARTS)

    def ppl_of(widths):
        for li, ws in widths.items():
            for e, b in enumerate(ws):
                layers[li].set_expert(e, *(rounded[li][b][e][p] for p in PARTS))
        return perplexity(model, ids, 512)["ppl"]

    out = {"model": a.model, "seed": a.seed, "uniform 3": ppl_of({li: [3] * len(s["freq"]) for li, s in stats.items()})}
    print(f"uniform 3: {out['uniform 3']:.3f}", flush=True)
    for bits in (3.0, 2.5):
        for name, cost in OBJECTIVES.items():
            widths = {}
            for li, s in stats.items():
                E = len(s["freq"])
                choice = allocate.solve(cost(s), np.tile([size_of(b) for b in CANDS], (E, 1)), size_of(bits) * E)
                widths[li] = [CANDS[j] for j in choice]
            out[f"{name} @ {bits}"] = p = ppl_of(widths)
            counts = {li: [ws.count(b) for b in CANDS] for li, ws in widths.items()}
            print(f"{name} @ {bits}: {p:.3f}  experts at 2/3/4 bits per layer: {counts}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
