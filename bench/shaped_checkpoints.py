"""Write random-weight checkpoints with the exact shapes of published MoE models.

Scale work (streaming, throughput, the I/O floor) needs real sizes, not tiny models, and the
Hub is not reachable from the bench machines. The configs below are transcribed from the
published config.json files; weights are random (normal, std 0.02) so only *speed and memory*
are meaningful on them, never quality. The tokenizer of the testbed is copied in so that text
calibration works (its ids are a subset of every vocabulary here).

    python bench/shaped_checkpoints.py olmoe-1b-7b /tmp/olmoe --tokenizer-from ../shared/testbed/models/qwen3moe-32x64-top4
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

PUBLISHED = {
    # not published: a small OLMoE shape to smoke-test the bench scripts on a CPU
    "tiny-olmoe": dict(model_type="olmoe", hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=4,
                       vocab_size=8192, max_position_embeddings=1024, tie_word_embeddings=False),
    # allenai/OLMoE-1B-7B-0924
    "olmoe-1b-7b": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                        vocab_size=50304, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                        norm_topk_prob=False, tie_word_embeddings=False),
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                              num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
                              moe_intermediate_size=1408, shared_expert_intermediate_size=5632, vocab_size=151936,
                              max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False),
    # deepseek-ai/DeepSeek-V2-Lite
    "deepseek-v2-lite": dict(model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
                             num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2,
                             num_experts_per_tok=6, moe_intermediate_size=1408, first_k_dense_replace=1,
                             kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128,
                             v_head_dim=128, vocab_size=102400, max_position_embeddings=163840, rms_norm_eps=1e-6,
                             topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                             norm_topk_prob=False, tie_word_embeddings=False),
    # Qwen/Qwen3-30B-A3B (61 GB in bf16: needs the disk for input and output)
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, vocab_size=151936,
                          max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                          norm_topk_prob=True, decoder_sparse_step=1, tie_word_embeddings=False),
    # deepseek-ai/DeepSeek-V3 (671B; too large to write: bench/scale.py --naee-layers builds its first layers in
    # GPU memory)
    "deepseek-v3": dict(model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                        num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, moe_intermediate_size=2048, first_k_dense_replace=3, n_group=8,
                        topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=512,
                        q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                        vocab_size=129280, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
                        tie_word_embeddings=False),
}


def make(name: str, out: Path, tokenizer_from: Path | None, device: str, seed: int = 0, layers: int | None = None) -> dict:
    """Save a random-weight checkpoint of shape ``name`` (its first ``layers`` decoder layers if given)."""
    kw = dict(PUBLISHED[name])
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    torch.manual_seed(seed)
    t0 = time.time()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    n = sum(p.numel() for p in model.parameters())
    save_by_layer(model, out)
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_from / f, out / f)
    del model
    return {"name": name, "params": n, "seconds": time.time() - t0}


def save_by_layer(model, out: Path, max_shard_bytes: int = 4 * 10**9) -> None:
    """``save_pretrained``'s files (the published per-expert key names, 4 GB shards), written
    one decoder layer at a time: ``save_pretrained`` reverts the fused experts of the whole
    model at once, a second copy of it (Qwen3-30B-A3B: 61 GB, over an 80 GB GPU). Each
    layer's tensors go through transformers' own revert, then to the CPU and into a shard."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    groups: dict[object, list[str]] = {}
    for key in state:
        m = re.search(r"\.layers\.(\d+)\.", key)
        groups.setdefault(int(m.group(1)) if m else key, []).append(key)
    shards: list[dict] = [{}]
    size = 0
    total = 0
    for keys in groups.values():
        part = revert_weight_conversion(model, {k: state[k] for k in keys})
        for key, t in part.items():
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = t.detach().to("cpu").contiguous()
            size += nbytes
            total += nbytes
        if len(shards) > 1:  # write the full shards now: CPU memory holds one shard
            for i in range(len(shards) - 1):
                save_file(shards[i], out / f"shard-{_written(out):05d}.tmp", metadata={"format": "pt"})
            shards = shards[-1:]
    save_file(shards[0], out / f"shard-{_written(out):05d}.tmp", metadata={"format": "pt"})
    files = sorted(out.glob("shard-*.tmp"))
    weight_map = {}
    for i, f in enumerate(files):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        from safetensors import safe_open

        with safe_open(f, "pt") as fh:
            weight_map.update({k: name for k in fh.keys()})
        f.rename(out / name)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def _written(out: Path) -> int:
    return len(list(out.glob("shard-*.tmp")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(PUBLISHED))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer-from", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    print(make(a.name, a.out, a.tokenizer_from, a.device))


if __name__ == "__main__":
    main()
