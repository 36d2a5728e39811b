"""Where the default re-fit's time goes, per layer: the first ``--layers`` decoder layers of a
published shape built in GPU memory (random weights, so speed only), pruned to half of their
experts and repaired with the library's own ``prune_and_repair`` on ``--sequences`` random
calibration sequences. Prints (and writes as JSON) one decoder layer's pass over all the
calibration batches, full and pruned, and the repair's phases (``bench/scale.py``'s table).

  python bench/repair_layers.py --shape olmoe-1b-7b --layers 4 --json OUT.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scale import phases  # noqa: E402
from shaped_checkpoints import PUBLISHED  # noqa: E402

from moecompress.arch import moe_view  # noqa: E402
from moecompress.capture import LayerCursor  # noqa: E402
from moecompress.repair import prune_and_repair  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="olmoe-1b-7b", choices=[k for k in PUBLISHED if k != "deepseek-v3"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per batch (the CLI's on a large GPU)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    kw = dict(PUBLISHED[a.shape], num_hidden_layers=a.layers)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.eval().requires_grad_(False)
    view = moe_view(model)
    E = view.layers[0].num_experts
    tokens = torch.randint(0, config.vocab_size, (a.sequences, a.seq_len))
    cursor = LayerCursor(model, tokens, batch_size=a.batch_size)
    start = cursor.state()
    first = view.layers[0]

    def one_pass():
        cursor.advance(first.layer_idx)
        cursor.restore(start)

    one_pass()  # CUDA warm-up
    full = timed(one_pass)
    original = copy.deepcopy(first.block)
    first.keep_experts(list(range(0, E, 2)))
    pruned = timed(one_pass)
    setattr(model.model.layers[first.layer_idx], view.spec.moe_block, original)
    kept = {layer.layer_idx: list(range(0, E, 2)) for layer in moe_view(model)}
    with phases() as ph:
        total = timed(lambda: prune_and_repair(model, kept, tokens, batch_size=a.batch_size, progress=False))
    row = {"shape": a.shape, "layers": a.layers, "tokens": a.sequences * a.seq_len, "batch_size": a.batch_size,
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "layer_pass_full_s": full, "layer_pass_pruned_s": pruned, "prune_and_repair_s": total,
           "per_layer_s": total / a.layers, "phases": ph.report()}
    print(f"one layer over {row['tokens']} tokens: {full:.3f} s full, {pruned:.3f} s pruned to {E // 2} experts")
    print(f"prune_and_repair, {a.layers} layers: {total:.3f} s ({total / a.layers:.3f} s per layer)")
    for label, v in row["phases"].items():
        print(f"  {label:50s} {v['s']:8.3f} s  {v['calls']} calls")
    if a.json:
        a.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
