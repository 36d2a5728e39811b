"""Writing a quantized model: ``compressed-tensors`` checkpoints and ``fake`` ones.

``compressed-tensors``: the input checkpoint's shards are rewritten one at a time (as the pruning
surgery does), each expert projection ``...experts.{e}.{proj}.weight`` replaced by what
compressed-tensors' own compressor makes of it (``pack-quantized``: ``weight_packed``,
``weight_scale``, ``weight_shape`` [, ``weight_zero_point``]; FP8: ``float-quantized`` ``weight``
+ ``weight_scale``), the names vLLM's and transformers' loaders expect. The ``quantization_config``
is compressed-tensors' ``QuantizationConfig``, one config group per width with ``re:`` targets
naming each MoE layer's expert projections (``ignore``: LM head and routers), written by its
``ModelCompressor.update_config``.

What loads it (checked against the sources, Nov 2026): vLLM resolves the scheme of each fused MoE
layer from that layer's expert 0 (``CompressedTensorsMoEMethod.get_moe_method``), so per-layer
widths are served there (its MoE kernels take 4 and 8 bits). transformers 5.17-5.24 dequantize
fused experts at load time with ONE config group for all layers (``get_experts_scheme``: the
first group whose ``re:`` targets mention experts), so a checkpoint whose layers differ in width
loads *silently wrong* in transformers; ``info`` and the record say so. Uniform checkpoints
reload exactly. Families whose checkpoints store fused 3-D expert tensors (GPT-OSS, Llama-4,
GraniteMoE) have no per-expert modules for a config group to name: ``--format fake`` only.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MoECompressError
from .experts import PARTS
from .grid import FP8, weight_args

FORMAT_OF = {"int": "pack-quantized", "float": "float-quantized"}


def _scheme(width, group_size: int, symmetric: bool, targets: list[str]):
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme

    if width == FP8:  # FP8 weights per channel, dynamic per-token activations: no calibration (FP8_DYNAMIC)
        s = preset_name_to_scheme("FP8_DYNAMIC", targets)
        s.format = FORMAT_OF["float"]
        return s
    return QuantizationScheme(targets=targets, weights=weight_args(width, group_size, symmetric),
                              format=FORMAT_OF["int"])


def compress_weight(w: torch.Tensor, qp, width, group_size: int, symmetric: bool, store: torch.dtype) -> dict:
    """The serialized tensors of one linear weight (names without the module prefix)."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = _scheme(width, group_size, symmetric, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    # GPTQ leaves the scales where it ran (the GPU); the weight is written from the CPU.
    zero = qp.zero_point.to(w.device) if qp.zero_point is not None else None
    sd = {"weight": w.float(), "weight_scale": qp.scale.to(w.device, store), "weight_zero_point": zero}
    return {k: v.contiguous() for k, v in compressor.compress(sd, scheme).items()}


def expert_keys(model, view) -> dict[str, tuple[int, int, str]]:
    """Checkpoint key -> (layer, expert, canonical part) of every routed expert weight, learnt
    from transformers' ``revert_weight_conversion`` (``surgery``); refuses fused checkpoints."""
    from ..surgery import _OneExpert, checkpoint_roles

    out = {}
    for layer in view:
        roles = checkpoint_roles(model, layer, layer.num_experts)
        one = _OneExpert(model, layer)
        if one.layer.expert_biases[0] is not None:
            raise MoECompressError(f"{view.spec.name} checkpoints store the experts as fused 3-D tensors, which no "
                                   "compressed-tensors loader quantizes per layer; use --format fake")
        marks = {p: torch.full(tuple(t.shape[1:]), float(i + 1)) for i, (p, t) in
                 enumerate(zip(PARTS, (layer.gate_proj, layer.up_proj, layer.down_proj)))}
        part_of = {}
        for key, t in one.revert(marks).items():
            if key.endswith(".weight") and t.dim() == 2 and t.numel() and float(t.flatten()[0]) in (1.0, 2.0, 3.0):
                part = PARTS[int(t.flatten()[0]) - 1]
                if tuple(t.shape) != tuple(marks[part].shape) or not torch.all(t == t.flatten()[0]):
                    raise MoECompressError(f"{view.spec.name}: expert weights are not stored as [out, in] matrices; "
                                           "use --format fake")
                part_of[_pattern(key)] = part
        if sorted(part_of.values()) != sorted(PARTS):
            raise MoECompressError(f"{view.spec.name} checkpoints store the experts as fused 3-D tensors, which no "
                                   "compressed-tensors loader quantizes per layer; use --format fake")
        for key, role in roles.items():
            if role.expert is not None and _pattern(key) in part_of:
                out[key] = (layer.layer_idx, role.expert, part_of[_pattern(key)])
    return out


def _pattern(key: str) -> str:
    return re.sub(r"experts\.\d+\.", "experts.#.", key)


def _target(module: str, generalise: str) -> str:
    """``re:`` target naming ``module`` with the index after ``generalise`` (e.g. ``experts.``) free."""
    marked = re.sub(rf"{re.escape(generalise)}\d+\.", f"{generalise}INDEX.", module)
    return "re:^" + re.escape(marked).replace("INDEX", r"\d+") + "$"


def quantization_config(result, keys: dict[str, tuple[int, int, str]], routers: list[str]):
    """compressed-tensors' ``QuantizationConfig``: one group per expert width (first, so that
    transformers' experts lookup finds an expert group), then the non-expert group."""
    from compressed_tensors.quantization import QuantizationConfig

    o = result.options
    by_width: dict = {}
    for key, (li, e, _) in keys.items():
        by_width.setdefault(result.widths[li][e], set()).add(_target(key.removesuffix(".weight"), "experts."))
    groups = {}
    for i, (width, targets) in enumerate(sorted(by_width.items(), key=lambda kv: str(kv[0]))):
        groups[f"group_{i}"] = _scheme(width, o["group_size"], o["symmetric"], sorted(targets))
    if result.non_expert:
        by_gs: dict = {}
        for name, info in result.non_expert.items():
            by_gs.setdefault(info["group_size"], set()).add(_target(name, "layers."))
        for gs, targets in sorted(by_gs.items()):
            groups[f"group_{len(groups)}"] = _scheme(o["non_expert_bits"], gs, o["symmetric"], sorted(targets))
    formats = {g.format for g in groups.values()}
    ignore = ["lm_head", *sorted({_target(r, "layers.") for r in routers})]
    return QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                              quantization_status="compressed", ignore=ignore)


@torch.no_grad()
def write_compressed_tensors(src: Path, out: Path, model, view, result, progress=None) -> dict:
    """Rewrite the shards of ``src`` into ``out`` with the quantized experts (and non-expert
    linears) of ``model``, whose weights hold the dequantized values. Returns the config group
    description written to ``config.json``."""
    from compressed_tensors.compressors import ModelCompressor

    from ..onload import onloaded
    from ..surgery import SHARD_INDEX, _input_shards

    keys = expert_keys(model, view)
    if not keys:
        raise MoECompressError(f"no per-expert weights found in {view.spec.name} checkpoint keys; use --format fake")
    o, store = result.options, result.store_dtype
    nonexp = {f"{name}.weight": name for name in result.non_expert}
    modules = dict(model.named_modules())
    weight_map, total = {}, 0
    for shard in _input_shards(src):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                if key in keys:
                    li, e, part = keys[key]
                    layer = view.layer(li)
                    with onloaded(layer.block):
                        w = {"gate": layer.gate_proj, "up": layer.up_proj, "down": layer.down_proj}[part][e].detach().cpu()
                    packed = compress_weight(w, result.qparams[li][e][part], result.widths[li][e], o["group_size"],
                                             o["symmetric"], store)
                elif key in nonexp:
                    name = nonexp[key]
                    info = result.non_expert[name]
                    with onloaded(modules[name]):
                        w = modules[name].weight.detach().cpu()
                    packed = compress_weight(w, info["qparams"], info["width"], info["group_size"], o["symmetric"], store)
                else:
                    tensors[key] = f.get_tensor(key)
                    continue
                prefix = key.removesuffix("weight")
                tensors.update({prefix + k: v for k, v in packed.items()})
        tensors = dict(sorted(tensors.items()))
        save_file(tensors, out / shard.name, metadata=metadata or {"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: shard.name for k in tensors})
        if progress is not None:
            progress(shard)
    if (src / SHARD_INDEX).exists():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SHARD_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for name in ("config.json", "generation_config.json"):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    routers = [f"{view.spec.layers_path}.{layer.layer_idx}.{view.spec.moe_block}.{view.spec.router}" for layer in view]
    qc = quantization_config(result, keys, routers)
    ModelCompressor(quantization_config=qc).update_config(str(out))
    return json.loads((out / "config.json").read_text())["quantization_config"]
