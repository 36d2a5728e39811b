"""Multi-token-prediction (MTP) layers: the decoder layers transformers does not build.

DeepSeek-V3/R1 and GLM-4.5 checkpoints store ``num_nextn_predict_layers`` extra decoder
layers after the last one (``model.layers.61.*`` in DeepSeek-V3) that vLLM loads for
speculative decoding. Each is a full decoder layer (attention + MoE, shaped like the last
decoder layer) plus its own ``enorm``, ``hnorm``, ``eh_proj`` (the projection of
[embedding; hidden] back to the hidden size), ``shared_head`` (norm + LM head) and
``embed_tokens``. transformers' config defaults the field to 1 even for checkpoints
without the layer, so an absent MTP layer is a note, not an error; a present one must match
the config like any other layer (its MoE has as many experts as the config says).
"""

from __future__ import annotations

import re

import torch
from torch import nn

_OWN = {  # MTP-only tensors (relative to the layer prefix) -> shape from (hidden, vocab)
    "enorm.weight": lambda h, v: (h,),
    "hnorm.weight": lambda h, v: (h,),
    "eh_proj.weight": lambda h, v: (h, 2 * h),
    "shared_head.norm.weight": lambda h, v: (h,),
    "shared_head.head.weight": lambda h, v: (v, h),
    "embed_tokens.weight": lambda h, v: (v, h),
}
LAYERS_PREFIX = "model.layers."


def num_mtp_layers(config) -> int:
    return int(getattr(config, "num_nextn_predict_layers", 0) or 0)


def mtp_layer_indices(config) -> list[int]:
    n = num_hidden(config)
    return list(range(n, n + num_mtp_layers(config)))


def num_hidden(config) -> int:
    return int(config.num_hidden_layers)


def layer_of(key: str) -> int | None:
    m = re.match(rf"{re.escape(LAYERS_PREFIX)}(\d+)\.", key)
    return int(m.group(1)) if m else None


def rename_layer(key: str, new_idx: int) -> str:
    return re.sub(rf"^{re.escape(LAYERS_PREFIX)}\d+\.", f"{LAYERS_PREFIX}{new_idx}.", key)


def expected_tensors(config, base: dict) -> dict:
    """The expected tensors of the MTP layers, given the expected tensors ``base`` of the
    model (``check._Expect`` values): the last decoder layer's, renamed, plus the MTP ones."""
    from .check import _Expect

    if not num_mtp_layers(config):
        return {}
    last = num_hidden(config) - 1
    layer_keys = {k: v for k, v in base.items() if layer_of(k) == last}
    dtypes = next(iter(layer_keys.values())).dtypes if layer_keys else frozenset()
    out = {}
    for idx in mtp_layer_indices(config):
        out.update({rename_layer(k, idx): v for k, v in layer_keys.items()})
        for name, shape in _OWN.items():
            out[f"{LAYERS_PREFIX}{idx}.{name}"] = _Expect(shape(config.hidden_size, config.vocab_size), dtypes)
    return out


def _present_layers(found) -> set[int]:
    return {layer_of(k) for k in found} - {None}


def absent_optional(logical: str, found, config) -> bool:
    """True for a tensor of an MTP layer of which the checkpoint holds nothing."""
    idx = layer_of(logical)
    return idx is not None and idx in mtp_layer_indices(config) and idx not in _present_layers(found)


def notes(config, found) -> list[str]:
    present = _present_layers(found)
    absent = [i for i in mtp_layer_indices(config) if i not in present]
    if not absent:
        return []
    return [f"num_nextn_predict_layers = {num_mtp_layers(config)} but no MTP layer {absent} is stored "
            "(transformers does not use it; vLLM's speculative decoding would need it)"]


# ----- MTP layers stored in a checkpoint ---------------------------------------------------
def stored_layers(folder, config) -> dict[int, dict[str, str]]:
    """MTP layer index -> {checkpoint key: shard file name} for the MTP layers ``folder`` holds."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                where.update((k, shard.name) for k in f.keys())
    wanted = set(mtp_layer_indices(config))
    out: dict[int, dict[str, str]] = {}
    for key, shard in where.items():
        idx = layer_of(key)
        if idx in wanted:
            out.setdefault(idx, {})[key] = shard
    return dict(sorted(out.items()))


def _load(folder, keys: dict[str, str], config, dtype) -> dict[str, torch.Tensor]:
    """The MTP layer's non-expert tensors, dequantized (FP8 block scales applied)."""
    from safetensors import safe_open

    from . import formats

    method, out = formats.quant_method(config), {}
    by_shard: dict[str, list[str]] = {}
    for k, s in keys.items():
        by_shard.setdefault(s, []).append(k)
    raw = {}
    for shard, ks in sorted(by_shard.items()):
        with safe_open(folder / shard, framework="pt") as f:
            raw.update((k, f.get_tensor(k)) for k in ks)
    for key, t in raw.items():
        logical, part = formats.logical_key(key, method)
        if part != "weight":
            continue
        scale = raw.get(formats.stored_key(logical, "scale")) if method == "fp8" else None
        out[key] = formats.dequantize_fp8(t, scale, formats.fp8_block(config), dtype) if scale is not None else t.to(dtype)
    return out


class _MoEInput(nn.Module):
    """Stands in for the MTP layer's MoE block: records its input, returns zeros."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, *args, **kwargs):
        self.seen.append(x)
        return torch.zeros_like(x)


@torch.no_grad()
def kept_by_own_router(model, folder, config, tokens: torch.Tensor, keep: int, *, batch_size: int = 8
                       ) -> tuple[dict[int, list[int]], dict[int, list[float]]]:
    """Kept experts of every stored MTP layer, by its own router's top-k frequency on the
    calibration text (the same count per group as the main layers under grouped routing).

    The MTP block runs as vLLM's ``deepseek_mtp`` runs it: for position i it combines the
    model's final (normed) hidden state h_i and the embedding of token i+1:
    ``x = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])``, then the decoder layer (attention with
    the main model's last layer's positions and mask). Only the attention, norms and router
    are built (the experts are not needed to route); the embedding is the main model's
    (DeepSeek-V3 shares it with its MTP layers)."""
    import operator
    from pathlib import Path

    from .arch import balanced_groups, moe_view
    from .capture import batches_of, execution_device
    from .onload import detached_copy, onloaded
    from .prune.scores import select_top

    folder = Path(folder)
    view = moe_view(model)
    spec = view.spec
    decoder_layers = operator.attrgetter(spec.layers_path)(model)
    last = decoder_layers[-1]
    norm = model.get_decoder().norm if hasattr(model, "get_decoder") else model.model.norm
    dev = execution_device(model)
    kept, counts_out = {}, {}
    groups = balanced_groups(config, spec, view.num_experts, keep)
    for idx, keys in stored_layers(folder, config).items():
        prefix = f"{LAYERS_PREFIX}{idx}."
        own = {k[len(prefix):]: v for k, v in _load(folder, {k: s for k, s in keys.items() if ".experts." not in k
                                                               and ".shared_experts." not in k}, config,
                                                      torch.float32).items()}
        with torch.device("meta"):
            layer = type(last)(model.config, num_hidden(config) - 1)  # model.config: its attention implementation
            setattr(layer, spec.moe_block, _MoEInput())
        missing = layer.load_state_dict({k: v for k, v in own.items() if not k.startswith(f"{spec.moe_block}.")},
                                        strict=False, assign=True).missing_keys
        if missing:
            raise ValueError(f"MTP layer {idx} lacks {prefix}{missing[0]}")
        src_router = view.layers[-1].router
        with onloaded(src_router):
            router = detached_copy(src_router)  # the main router's module, given the MTP layer's rows
        r_prefix = f"{spec.moe_block}.{spec.router}."
        router.load_state_dict({k[len(r_prefix):]: v for k, v in own.items() if k.startswith(r_prefix)}, strict=True)
        with onloaded(norm):
            enorm, hnorm = detached_copy(norm), detached_copy(norm)
        enorm.load_state_dict({"weight": own["enorm.weight"]})
        hnorm.load_state_dict({"weight": own["hnorm.weight"]})
        eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        eh_proj.weight.data = own["eh_proj.weight"]
        parts = nn.ModuleList([layer, router, enorm, hnorm, eh_proj]).to(dev, torch.float32).eval()

        captured: dict = {}

        def grab_kwargs(mod, args, kwargs):
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        def grab_hidden(mod, args, out):
            captured["h"] = out

        h1 = last.register_forward_pre_hook(grab_kwargs, with_kwargs=True)
        h2 = norm.register_forward_hook(grab_hidden)
        counts = torch.zeros(view.num_experts, dtype=torch.float64)
        try:
            for batch in batches_of(tokens, batch_size):
                if batch.shape[1] < 2:
                    continue
                model.get_decoder()(input_ids=batch[:, :-1].to(dev), use_cache=False)
                with onloaded(model.get_input_embeddings()):
                    emb = model.get_input_embeddings()(batch[:, 1:].to(dev))
                h = captured["h"]
                x = eh_proj(torch.cat([enorm(emb.to(dev, torch.float32)), hnorm(h.to(dev, torch.float32))], dim=-1))
                moe_in = getattr(layer, spec.moe_block)
                moe_in.seen.clear()
                layer(x, **captured["kwargs"])
                y = moe_in.seen[-1]
                routing = view.layers[-1].routing_from_router_output(router(y.reshape(-1, y.shape[-1])))
                counts += torch.bincount(routing.topk_idx.flatten().cpu(), minlength=view.num_experts).double()
        finally:
            h1.remove()
            h2.remove()
        kept[idx] = select_top(counts, keep, groups=groups)
        counts_out[idx] = counts.tolist()
    return kept, counts_out
