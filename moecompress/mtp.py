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
