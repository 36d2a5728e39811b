"""Pruning that never materialises the whole model: streamed calibration + shard surgery.

For checkpoints larger than the GPU (Qwen3-235B, DeepSeek-V3): the model is loaded under a GPU
(and CPU) memory cap, accelerate onloading each layer while it runs (``load_model(...,
max_gpu_memory=...)``); the pruning method decides which experts each layer keeps from the
calibration pass; the output is then written by rewriting the input's safetensors shards one
at a time (``surgery.prune_checkpoint_files``), so neither the GPU nor the CPU ever holds the
whole model and the output holds the input's tensors bit for bit, in the input's dtype.
"""

from __future__ import annotations

import os
import time

import torch

from .checkpoint import copy_tokenizer, load_config, load_model, output_folder, resolve_source, write_record
from .errors import MoECompressError
from .surgery import prune_checkpoint_files


def prune_streaming(src: str | os.PathLike, out: str | os.PathLike, *, keep: int | None = None,
                    ratio: float | None = None, method: str = "frequency", calib: str | None = None, n: int = 64,
                    seq_len: int = 512, seed: int = 0, max_gpu_memory: str | None = None,
                    max_cpu_memory: str | None = None, overwrite: bool = False, dtype: str = "auto",
                    device: str | None = None, batch_size: int = 8, progress: bool = True, **options) -> dict:
    """Prune ``src`` into ``out`` with bounded memory; returns the record written to ``out``."""
    from transformers import AutoTokenizer

    from .arch import family_for_config
    from .calibration import load_calibration
    from .prune.api import plan_pruning, resolve_keep

    start = time.perf_counter()
    source = resolve_source(src)
    if not hasattr(source, "is_dir"):
        raise MoECompressError("streamed pruning rewrites local shards: download the checkpoint and pass its folder")
    config = load_config(src)
    spec = family_for_config(config)
    num_experts = int(getattr(config, spec.num_experts_field))
    keep = resolve_keep(num_experts, keep, ratio)
    if calib is None and method != "random":
        raise MoECompressError(f"method '{method}' needs calibration text: pass --calib FILE")
    with output_folder(out, overwrite=overwrite, source=src) as folder:
        if device is None and max_gpu_memory is None and torch.cuda.is_available():
            device = "cuda"
        model = load_model(src, dtype=dtype, device=None if max_gpu_memory else device,
                           max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory)
        tokens = None
        if calib is not None:
            tok = AutoTokenizer.from_pretrained(source)
            tokens = load_calibration(tok, calib, n=n, seq_len=seq_len, seed=seed)
        plan, protected = plan_pruning(model, keep=keep, method=method, tokens=tokens, seed=seed,
                                       batch_size=batch_size, progress=progress, **options)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        prune_checkpoint_files(source, folder, plan.kept)
        copy_tokenizer(src, folder)
        record = {"stage": "prune", "method": method, "seed": seed, "writer": "shard surgery (streamed)",
                  "parameters": {"keep": keep, "ratio": ratio, "num_experts_before": num_experts, "calib": calib,
                                 "n": n, "seq_len": seq_len, "max_gpu_memory": max_gpu_memory,
                                 "max_cpu_memory": max_cpu_memory, "dtype": dtype, **options},
                  "kept": {str(k): v for k, v in sorted(plan.kept.items())}}
        write_record(folder, record, src)
    record["seconds"] = time.perf_counter() - start
    return record
