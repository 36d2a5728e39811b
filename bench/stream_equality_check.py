"""Streamed vs in-memory merge on the CPU: do they write the same bytes? (issue 8)

    python bench/stream_equality_check.py              # NOALIGN=1: without load_model's weight alignment

Builds a random 62M-parameter Qwen3-MoE-shaped checkpoint (4 layers, 32 experts, 20 MB shards)
in a temporary folder, merges it to 16 experts (m-smoe + re-fit) in memory and with
``--max-cpu-memory 64MiB`` (streamed, disk offload), and prints how many output tensors differ
and by how much. Needs the testbed's tokenizer next to the repository.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT.parent / "shared" / "testbed" / "models" / "qwen3moe-32x64-top4"


def main() -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    import moecompress.checkpoint as checkpoint
    from moecompress.merge.checkpoint import merge_checkpoint
    from moecompress.testing import SAMPLE_TEXT

    torch.set_num_threads(1)
    if os.environ.get("NOALIGN"):
        checkpoint._align_cpu_weights = lambda model: None
    work = Path(tempfile.mkdtemp())
    cfg = AutoConfig.for_model("qwen3_moe", hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32,
                               num_experts_per_tok=4, moe_intermediate_size=256, vocab_size=8192,
                               max_position_embeddings=1024, norm_topk_prob=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(work / "src", max_shard_size="20MB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(TOKENIZER / f, work / "src" / f)
    print(f"params {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M")
    (work / "calib.txt").write_text(SAMPLE_TEXT * 20)
    for label, caps in (("in-memory", {}), ("streamed", {"max_cpu_memory": "64MiB"})):
        t = time.time()
        merge_checkpoint(work / "src", work / label, keep=16, calib=str(work / "calib.txt"), n=8, seq_len=128,
                         progress=False, **caps)
        print(f"{label}: {time.time() - t:.1f} s")
    a, b = {}, {}
    for out, tensors in ((work / "in-memory", a), (work / "streamed", b)):
        for f in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(f))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    worst = max(((a[k] - b[k]).abs().max().item() for k in differ), default=0.0)
    print(f"tensors {len(a)}, differing {len(differ)}, max |difference| {worst:.3g}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
