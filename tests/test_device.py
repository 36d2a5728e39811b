"""--device auto: the decision, tested without a GPU by giving the GPU's size."""

import torch

from moecompress.device import choose_device, model_bytes
from moecompress.testing import tiny_config

GiB = 2**30


def test_model_bytes_counts_the_weights_in_the_compute_dtype():
    cfg = tiny_config("qwen3_moe")
    n = sum(p.numel() for p in __import__("moecompress.testing", fromlist=["tiny_model"]).tiny_model("qwen3_moe").parameters())
    assert model_bytes(cfg, "float32") == 4 * n and model_bytes(cfg, "bfloat16") == 2 * n
    cfg.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert model_bytes(cfg) == 2 * n  # a quantized checkpoint computes dequantized, in bf16


def test_choice_gpu_stream_or_cpu():
    cfg = tiny_config("qwen3_moe")
    size = model_bytes(cfg, "bfloat16")
    fits = choose_device(cfg, None, "bfloat16", gpu_bytes=int(size / 0.7) + 1, gpu_name="H200")
    assert (fits.device, fits.max_gpu_memory) == ("cuda", None) and fits.line.startswith("device: cuda (H200")
    big = choose_device(cfg, "auto", "bfloat16", gpu_bytes=int(size / 0.7) - 1, gpu_name="H200")
    assert big.device is None and big.streamed and "streamed" in big.line
    assert choose_device(cfg, None, "bfloat16", gpu_bytes=int(size / 0.7) - 1, can_stream=False).device is None
    assert choose_device(cfg, None, gpu_bytes=0).line == "device: cpu (no GPU)"
    assert choose_device(cfg, "cuda:1", gpu_bytes=0).device == "cuda:1"  # an explicit device is kept
    capped = choose_device(cfg, None, max_gpu_memory="4GiB", gpu_bytes=80 * GiB)
    assert (capped.device, capped.max_gpu_memory) == (None, "4GiB")


def test_choice_at_real_scale():
    """DeepSeek-V3's 671B parameters (1.25 TiB in bf16) stream on one 141 GB H200; Qwen3-30B-A3B
    (61 GB in bf16) fits it."""
    from transformers import AutoConfig

    v3 = AutoConfig.for_model("deepseek_v3", num_hidden_layers=61, hidden_size=7168, intermediate_size=18432,
                              moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                              num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                              qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280,
                              first_k_dense_replace=3, dtype="bfloat16",
                              quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert 1.3e12 < model_bytes(v3) < 1.4e12
    c = choose_device(v3, None, gpu_bytes=141 * 10**9, gpu_name="H200")
    assert c.streamed and c.max_gpu_memory == "124GiB"
    q3 = AutoConfig.for_model("qwen3_moe", num_hidden_layers=48, hidden_size=2048, moe_intermediate_size=768,
                              num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                              head_dim=128, vocab_size=151936, intermediate_size=6144, dtype="bfloat16")
    assert choose_device(q3, None, gpu_bytes=141 * 10**9).device == "cuda"
