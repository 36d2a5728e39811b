"""DeepSeek-V3-shaped FP8 checkpoint with an MTP layer: prune to 50% with the default method on one GPU.

Issue 16's acceptance run. The checkpoint has DeepSeek-V3's real shapes (hidden 7168, 256
routed experts of 2048, n_group 8 / topk_group 4, top-8, MLA attention, vocab 129280) stored as
the published checkpoint stores them (block-wise FP8 e4m3 with 128x128 ``weight_scale_inv``;
router, norms, embeddings and LM head in bf16) with one multi-token-prediction layer
(``num_nextn_predict_layers: 1``, ``model.layers.{L}.*``), but only ``--layers`` decoder layers
(the first dense, the rest MoE): "as many layers as the disk holds". Weights are random
(normal, std 0.02): only time and memory mean anything.

    # 1. write the input (about 11.6 GB per MoE layer, the MTP layer included) to a RAM disk
    python bench/deepseek_v3_fp8_mtp.py make /dev/shm/dsv3 --layers 3 --tokenizer-from ../testbed/models/qwen3moe-32x64-top4
    # 2. prune to 50% (default method, --device auto), check, reload; time vs the floor, peak GPU memory
    python bench/deepseek_v3_fp8_mtp.py run /dev/shm/dsv3 --out /tmp/dsv3-half --calib ../testbed/text/calib_mix.txt \
        --json $OUT/dsv3_fp8_mtp_h200.json

The floor is read + write + one forward of the calibration tokens, measured on the same machine
in the same run (bench/scale.py's read_rate / write_rate / matmul_rate).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# deepseek-ai/DeepSeek-V3 config.json (num_hidden_layers set by --layers, first_k_dense_replace 1)
DSV3 = dict(hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
            n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
            norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", num_attention_heads=128,
            num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
            v_head_dim=128, vocab_size=129280, max_position_embeddings=163840, rms_norm_eps=1e-6,
            rope_theta=10000.0, tie_word_embeddings=False, num_nextn_predict_layers=1, dtype="bfloat16",
            bos_token_id=0, eos_token_id=1,
            quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]})
# A CPU smoke test of the scripts (not a benchmark): the same structure at a small size.
SMOKE = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=16, n_group=4,
             topk_group=2, num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128,
             kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32)
_BF16 = ("norm", "embed_tokens", "lm_head", "shared_head.head", "mlp.gate.", "e_score_correction_bias")


def make(out: Path, layers: int, tokenizer_from: Path | None, device: str, seed: int = 0, smoke: bool = False) -> dict:
    """Write the checkpoint one decoder layer per shard, FP8-quantized on ``device``."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from moecompress import formats, mtp
    from moecompress.check import expected_tensors

    config = AutoConfig.for_model("deepseek_v3", num_hidden_layers=layers, first_k_dense_replace=1,
                                  **{**DSV3, **(SMOKE if smoke else {})})
    expected = expected_tensors(config)  # every key and shape, MTP layer included
    groups: dict[object, list[str]] = {}
    for key in sorted(expected):
        groups.setdefault(mtp.layer_of(key), []).append(key)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    t0, weight_map, total = time.time(), {}, 0
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, (_, keys) in zip(names, sorted(groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))):
        shard = {}
        for key in keys:
            shape = expected[key].shape
            if len(shape) == 1:
                t = torch.zeros(shape, device=device) if "bias" in key else torch.ones(shape, device=device)
                shard[key] = t.to(torch.float32 if "e_score_correction_bias" in key else torch.bfloat16)
                continue
            w = torch.randn(shape, generator=g, device=device) * 0.02
            if any(s in key for s in _BF16):
                shard[key] = w.to(torch.bfloat16)
            else:
                q, s = formats.quantize_fp8(w, (128, 128))
                shard[key], shard[formats.stored_key(key, "scale")] = q, s
        shard = {k: v.cpu().contiguous() for k, v in sorted(shard.items())}
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config.save_pretrained(out)
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_from / f, out / f)
    return {"layers": layers, "bytes": total, "seconds": round(time.time() - t0, 1)}


def run(src: Path, out: Path, calib: str, n: int, seq_len: int) -> dict:
    from scale import folder_bytes, matmul_rate, read_rate, write_rate

    from moecompress.check import check_checkpoint
    from moecompress.checkpoint import load_model
    from moecompress.prune import prune_checkpoint

    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    res: dict = {"input": str(src), "input_bytes": folder_bytes(src), "gpu": torch.cuda.get_device_name(0) if gpu else None}
    res["read_Bps"] = read_rate(src)
    probe = out.parent / (out.name + ".probe")
    probe.mkdir(parents=True, exist_ok=True)
    res["write_Bps"] = write_rate(probe, res["input_bytes"] // 2)
    shutil.rmtree(probe, ignore_errors=True)
    res["matmul_flops"] = matmul_rate(dev)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = prune_checkpoint(src, out, ratio=0.5, calib=calib, n=n, seq_len=seq_len, overwrite=True)  # default: naee, --device auto
    res["prune_seconds"] = time.perf_counter() - t0
    res["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
    res["method"], res["kept_per_layer"] = result.method, result.keep
    res["output_bytes"] = folder_bytes(out)
    record = json.loads((out / "moecompress.json").read_text())
    res["mtp_kept"] = {k: len(v) for k, v in record.get("mtp", {}).get("kept_experts", {}).items()}
    res["groups"] = result.info.get("groups")
    t0 = time.perf_counter()
    report = check_checkpoint(out)
    res["check_seconds"], res["check_ok"], res["check_problems"] = time.perf_counter() - t0, report.ok, report.problems[:3]
    t0 = time.perf_counter()
    model = load_model(out, device=dev if gpu else None)  # reload (dequantized, as every stage computes)
    ids = torch.randint(3, 1000, (1, 64), device=dev)
    with torch.no_grad():
        logits = model(ids).logits
    res["reload_seconds"], res["reload_finite"] = time.perf_counter() - t0, bool(torch.isfinite(logits).all())
    # floor: read the input, write the output, one forward over the calibration tokens (2 x active params x tokens)
    active = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    c = model.config
    active += c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size * (len(model.model.layers) - 1)
    res["floor_seconds"] = (res["input_bytes"] / res["read_Bps"] + res["output_bytes"] / res["write_Bps"]
                            + 2 * active * n * seq_len / res["matmul_flops"])
    res["vs_floor"] = res["prune_seconds"] / res["floor_seconds"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out", type=Path)
    m.add_argument("--layers", type=int, default=3)
    m.add_argument("--tokenizer-from", type=Path)
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--smoke", action="store_true", help="small dimensions: a CPU test of the scripts")
    r = sub.add_parser("run")
    r.add_argument("src", type=Path)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--calib", required=True)
    r.add_argument("-n", type=int, default=64)
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = make(a.out, a.layers, a.tokenizer_from, a.device, smoke=a.smoke) if a.cmd == "make" else run(a.src, a.out, a.calib, a.n, a.seq_len)
    print(json.dumps(res, indent=2))
    if getattr(a, "json", None):
        a.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
