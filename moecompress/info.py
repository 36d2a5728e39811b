"""`moecompress info`: what a checkpoint is, computed without loading its weights."""

from __future__ import annotations

import json
import os
import struct
from collections import defaultdict
from pathlib import Path

import torch

from .arch import MoEModel, family_for_config
from .checkpoint import load_config, source_folder


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    # Build on the meta device: shapes only, no memory, so 235B models are instant.
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def safetensors_sizes(folder: Path) -> dict[str, int]:
    """Bytes on disk per dtype, read from the safetensors headers only."""
    sizes: dict[str, int] = defaultdict(int)
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key != "__metadata__":
                start, end = t["data_offsets"]
                sizes[t["dtype"]] += end - start
    return dict(sizes)


def model_info(src: str | os.PathLike) -> dict:
    config = load_config(src)
    spec = family_for_config(config)
    model = _meta_model(config)
    view = MoEModel(model, spec)
    total = sum(p.numel() for p in model.parameters())
    routed_total = routed_active = 0
    layers = []
    for layer in view:
        per_expert = sum(p[0].numel() for p in layer.expert_parameters().values())
        shared = sum(p.numel() for p in layer.shared_experts.parameters()) if layer.shared_experts is not None else 0
        routed_total += per_expert * layer.num_experts
        routed_active += per_expert * layer.top_k
        layers.append({"layer": layer.layer_idx, "experts": layer.num_experts, "top_k": layer.top_k,
                       "intermediate": layer.intermediate_size, "params_per_expert": per_expert,
                       "shared_expert_params": shared})
    folder = source_folder(src)
    if folder is not None:
        from .integrity import check_shards

        check_shards(folder)  # a truncated or missing shard is not "the size on disk"
    disk = safetensors_sizes(folder) if folder is not None else {}
    from .quantize.inspect import quantization_info

    fused = tuple(f".{n}" for n in view.layers[0].expert_parameters()) if view.layers else ()
    quant = quantization_info(folder, config, routed_total, fused)
    return {
        "model": str(src),
        "family": spec.name,
        "model_type": config.model_type,
        "num_layers": view.num_layers,
        "moe_layers": view.moe_layer_indices,
        "dense_layers": view.dense_layer_indices,
        "num_moe_layers": len(view),
        "experts_per_layer": sorted({d["experts"] for d in layers}),
        "num_experts": view.num_experts,
        "top_k": view.top_k,
        "shared_experts": any(d["shared_expert_params"] for d in layers),
        "routing": {"scoring": spec.scoring, **view.config_summary()},
        "total_params": total,
        "active_params": total - routed_total + routed_active,
        "routed_expert_params": routed_total,
        "layers": layers,
        "disk_bytes_by_dtype": disk,
        "disk_bytes": sum(disk.values()),
        **({"quantization": quant} if quant is not None else {}),
    }
