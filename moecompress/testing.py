"""Tiny random models of every supported family, for tests and examples (no network).

Each config keeps the family's distinctive routing features switched on (shared experts,
grouped routing, correction biases, dense first layers) at a size that runs in milliseconds.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               vocab_size=96, max_position_embeddings=128, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=24),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, intermediate_size=48),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                      head_dim=8, intermediate_size=48, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=None, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", intermediate_size=48, **_MLA),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=16, n_group=2, topk_group=1,
                        intermediate_size=48, **_MLA),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16, head_dim=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=2, topk_group=1, intermediate_size=48, head_dim=8),
    "llama4_text": dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size=16, intermediate_size_mlp=48,
                        head_dim=8, interleave_moe_layer_step=1, no_rope_layers=[1, 1, 1]),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=16),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=16, moe_num_shared_experts=1,
                         moe_layer_start_index=1, intermediate_size=48),
}


def tiny_config(model_type: str, **overrides):
    kw = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny model of ``model_type`` in eval mode.

    Routers and correction biases are initialised to zero by transformers; random values are
    written so that routing actually varies between tokens and experts.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.1
                    if "norm" not in name else 1.0 + 0.1 * torch.randn(p.shape, generator=g).to(p.dtype))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model.eval()


def pruned_with_originals(model_type: str, kept: list[int], seed: int = 0):
    """A tiny model whose MoE layers keep ``kept`` experts, and its original MoE blocks
    ``{layer_idx: block}`` (the repair's reference)."""
    from .arch import moe_view
    from .refit import swap_in_copies

    model = tiny_model(model_type, seed=seed)
    originals = swap_in_copies(model)
    view = moe_view(model)
    view.keep_experts({layer.layer_idx: list(kept) for layer in view})
    return model, originals


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files."""
    from pathlib import Path

    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def tokens(batch: int = 2, seq: int = 12, vocab: int = 90, seed: int = 0) -> torch.Tensor:
    """Random token ids inside every tiny model's vocabulary (ids 0-2 are special)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def char_tokenizer():
    """A character-level tokenizer whose ids fit the tiny models' 96-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,:;()[]=+-*/#'\"_?!<>ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_checkpoint(folder, model_type: str = "qwen3_moe", seed: int = 0, **overrides):
    """Save a tiny model *with* a tokenizer to ``folder`` (what CLI stages need); returns the model."""
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return model


SAMPLE_TEXT = (
    "def mean(values):\n    return sum(values) / len(values)\n\n"
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
) * 40


def invoke_cli(*args):
    """Run the ``moecompress`` CLI in-process (typer's CliRunner); arguments may be paths/numbers."""
    from typer.testing import CliRunner

    from .cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def quantized_checkpoint(folder, model_type: str, fmt: str, seed: int = 0, block: tuple[int, int] = (16, 16),
                         **overrides):
    """Save a tiny bf16 model, then rewrite it in a published quantized format (``formats.py``),
    exactly as the published checkpoints store it: ``fmt="fp8"`` (DeepSeek-V3 style: every
    2-D/3-D projection weight of attention and MLPs block-wise FP8 with ``weight_scale_inv``;
    router, norms, embeddings, LM head stay bf16) or ``"mxfp4"`` (GPT-OSS style: the fused
    expert tensors as ``_blocks``/``_scales``). Returns the bf16 model that was quantized."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from . import formats
    from .arch import family_for_config

    folder = Path(folder)
    model = tiny_model(model_type, seed=seed, dtype=torch.bfloat16, **overrides)
    model.save_pretrained(folder)
    spec = family_for_config(model.config)
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for key, t in sorted(tensors.items()):
        routerish = f".{spec.router}." in key or key.endswith(f".{spec.router}.weight")
        if fmt == "fp8" and key.endswith(".weight") and t.dim() >= 2 and not routerish \
                and not any(s in key for s in ("embed", "lm_head", "norm")):
            q, s = zip(*(formats.quantize_fp8(m, block) for m in t.reshape(-1, *t.shape[-2:])))
            out[key] = torch.stack(q).reshape(t.shape)
            out[formats.stored_key(key, "scale")] = torch.stack(s).reshape(*t.shape[:-2], *s[0].shape)
        elif fmt == "mxfp4" and re.search(r"\.experts\.(gate_up_proj|down_proj)$", key):
            out[key + "_blocks"], out[key + "_scales"] = formats.quantize_mxfp4(t)
        else:
            out[key] = t
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": list(block)} if fmt == "fp8" else
                                  {"quant_method": "mxfp4", "modules_to_not_convert":
                                   ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    char_tokenizer().save_pretrained(folder)
    return model


def with_mtp_layer(folder, seed: int = 1) -> None:
    """Write a multi-token-prediction layer into the tiny DeepSeek-V3 / GLM-4.5 checkpoint in
    ``folder`` as the published checkpoints store it (``mtp.py``): ``model.layers.{L}.*`` shaped
    like the last decoder layer (random values) plus enorm/hnorm/eh_proj/shared_head/embed_tokens,
    and ``num_nextn_predict_layers: 1``."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    n, h, v = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    tensors = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    new = dict(tensors)
    for key, t in tensors.items():
        if key.startswith(f"model.layers.{n - 1}."):
            if t.dtype in (torch.float32, torch.bfloat16, torch.float16) and not key.endswith("_scale_inv"):
                fresh = (torch.randn(t.shape, generator=g) * 0.1 if "norm" not in key
                         else 1 + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype)
            else:  # a quantized checkpoint's FP8 weights and scales: the last layer's, as stored
                fresh = t.clone()
            new[key.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.")] = fresh
    dtype = tensors["model.embed_tokens.weight"].dtype
    own = {"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h), "shared_head.norm.weight": (h,),
           "shared_head.head.weight": (v, h)}
    for name, shape in own.items():
        new[f"model.layers.{n}.{name}"] = (1 + 0.1 * torch.randn(shape, generator=g) if "norm" in name
                                           else 0.1 * torch.randn(shape, generator=g)).to(dtype)
    new[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(dict(sorted(new.items())), folder / "model.safetensors", metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
