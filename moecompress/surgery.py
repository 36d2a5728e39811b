"""Checkpoint surgery: remove experts by rewriting safetensors shards, never loading the model.

Pruning a 235B-parameter checkpoint should cost little more than reading the input and
writing the output once. This module copies every tensor of the input shards, dropping the
removed experts' tensors, renumbering the kept ones and slicing router rows and biases, one
shard at a time (memory is bounded by the largest shard).

Key names differ between checkpoints (Mixtral's ``block_sparse_moe.experts.3.w1.weight`` vs
Qwen's ``mlp.experts.3.gate_proj.weight`` vs GPT-OSS's fused ``mlp.experts.gate_up_proj``).
Rather than declaring them per family, we ask transformers: its ``revert_weight_conversion``
(what ``save_pretrained`` uses) is applied to small *probe* tensors whose values are the
expert index, which tells, for every checkpoint key of an MoE layer, which expert it holds or
along which dimension it stacks the experts.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .arch import MoELayer, MoEModel, family_for_config
from .checkpoint import load_config

SHARD_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class KeyRole:
    expert: int | None  # the expert a per-expert key holds
    expert_dim: int | None  # the dimension along which a fused key stacks experts
    slot: int  # position among the keys of the same expert (w1/w2/w3 ...), for renaming


def _probe_state(layer: MoELayer, prefix: str, num_experts: int) -> dict[str, torch.Tensor]:
    """Tiny tensors shaped like the layer's per-expert tensors, valued with the expert index."""
    probes = {}

    def probe(shape_rest: tuple[int, ...], expert_axis: int) -> torch.Tensor:
        shape = list(shape_rest)
        shape.insert(expert_axis if expert_axis >= 0 else len(shape) + 1 + expert_axis, num_experts)
        idx = torch.arange(num_experts, dtype=torch.float32)
        view = [1] * len(shape)
        view[expert_axis] = num_experts
        return idx.view(view).expand(shape).clone()

    for name, p in layer.experts.named_parameters(recurse=False):
        # Keep 2 where a dimension is split in two (gate|up); 1 elsewhere keeps probes tiny.
        rest = tuple(2 if (d % 2 == 0 and "gate_up" in name) else 1 for d in p.shape[1:])
        probes[f"{prefix}{layer.spec.experts}.{name}"] = probe(rest, 0)
    probes[f"{prefix}{layer.spec.router}.weight"] = probe((1,), 0)
    for path, t in layer.router_expert_tensors.items():
        probes[f"{prefix}{layer.spec.router}.{path}"] = probe(tuple(1 for _ in t.shape[:-1]), -1)
    return probes


def checkpoint_roles(model, layer: MoELayer, num_experts: int) -> dict[str, KeyRole]:
    """Checkpoint key -> role for the routed-expert and router tensors of one MoE layer."""
    from transformers.core_model_loading import revert_weight_conversion

    prefix = f"{layer.spec.layers_path}.{layer.layer_idx}.{layer.spec.moe_block}."
    reverted = revert_weight_conversion(model, _probe_state(layer, prefix, num_experts))
    roles: dict[str, KeyRole] = {}
    slots: dict[int, int] = {}
    for key, t in reverted.items():
        varying = [d for d in range(t.dim()) if t.shape[d] == num_experts and num_experts > 1
                   and not torch.equal(t.select(d, 0), t.select(d, num_experts - 1))]
        if varying:
            roles[key] = KeyRole(expert=None, expert_dim=varying[0], slot=0)
        else:
            e = int(t.flatten()[0])
            roles[key] = KeyRole(expert=e, expert_dim=None, slot=slots.get(e, 0))
            slots[e] = slots.get(e, 0) + 1
    return roles


def _meta_view(config) -> MoEModel:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return MoEModel(model, family_for_config(config))


def _input_shards(src: Path) -> list[Path]:
    if (src / SHARD_INDEX).exists():
        files = sorted(set(json.loads((src / SHARD_INDEX).read_text())["weight_map"].values()))
        return [src / f for f in files]
    return sorted(src.glob("*.safetensors"))


def prune_checkpoint_files(src: Path, out: Path, keep: dict[int, list[int]], progress=None) -> None:
    """Write into ``out`` the shards and config of ``src`` with only ``keep[layer]`` experts.

    The kept count must be the same in every MoE layer (one config field describes it).
    """
    config = load_config(src)
    old = _meta_view(config)
    new_config = type(config).from_dict(config.to_dict())
    new = _meta_view(new_config)
    new.keep_experts({layer.layer_idx: list(range(len(keep[layer.layer_idx]))) for layer in new})  # sizes only

    plan: dict[str, list[tuple[str, torch.Tensor | None, int | None]]] = {}
    for layer_old, layer_new in zip(old, new):
        kept = keep[layer_old.layer_idx]
        old_roles = checkpoint_roles(old.model, layer_old, layer_old.num_experts)
        new_roles = checkpoint_roles(new.model, layer_new, len(kept))
        new_by_expert = {(r.expert, r.slot): k for k, r in new_roles.items() if r.expert is not None}
        index = torch.tensor(kept, dtype=torch.long)
        for key, role in old_roles.items():
            if role.expert_dim is not None:  # fused: slice along the expert dimension
                plan[key] = [(key, index, role.expert_dim)]
            elif role.expert in kept:  # per-expert: rename to the new position
                j = kept.index(role.expert)
                new_key = new_by_expert[(j, role.slot)]
                assert re.sub(r"\d+", "#", new_key) == re.sub(r"\d+", "#", key), (key, new_key)
                plan[key] = [(new_key, None, None)]
            else:
                plan[key] = []  # removed expert

    shards = _input_shards(src)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                targets = plan.get(key, [(key, None, None)])
                for new_key, index, dim in targets:
                    t = f.get_tensor(key)
                    tensors[new_key] = t.index_select(dim, index).contiguous() if index is not None else t
        # Kept order: sorted keys give deterministic bytes whatever the dict order was.
        tensors = dict(sorted(tensors.items()))
        save_file(tensors, out / shard.name, metadata=metadata or {"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: shard.name for k in tensors})
        if progress is not None:
            progress(shard)
    if (src / SHARD_INDEX).exists():
        index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SHARD_INDEX).write_text(json.dumps(index_json, indent=2) + "\n")
    new.model.config.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copyfile(src / extra, out / extra)
