"""The MoE view over a transformers model: family registry and per-layer views."""

from __future__ import annotations

import importlib
import operator
import pkgutil
from functools import lru_cache

from torch import nn

from ..errors import MoECompressError
from .spec import FamilySpec
from .view import MoELayer, Routing

__all__ = ["FamilySpec", "MoELayer", "MoEModel", "Routing", "registry", "family_for_config", "moe_view"]


@lru_cache(maxsize=None)
def registry() -> dict[str, FamilySpec]:
    """model_type -> spec, from every module in ``arch/families``."""
    from . import families as pkg

    out: dict[str, FamilySpec] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        spec: FamilySpec = importlib.import_module(f"{pkg.__name__}.{info.name}").SPEC
        for mt in spec.model_types:
            out[mt] = spec
    return out


def supported_names() -> str:
    return ", ".join(sorted({s.name for s in registry().values()}))


def family_for_config(config) -> FamilySpec:
    model_type = getattr(config, "model_type", None)
    spec = registry().get(model_type)
    if spec is None:
        raise MoECompressError(
            f"model type '{model_type}' is not a supported Mixture-of-Experts family; "
            f"supported: {supported_names()}"
        )
    return spec


class MoEModel:
    """All MoE layers of a model, plus the config fields that describe them."""

    def __init__(self, model: nn.Module, spec: FamilySpec):
        self.model = model
        self.spec = spec
        self.config = model.config
        decoder_layers = operator.attrgetter(spec.layers_path)(model)
        self.num_layers = len(decoder_layers)
        self.layers: list[MoELayer] = []
        for i, layer in enumerate(decoder_layers):
            block = getattr(layer, spec.moe_block, None)
            if block is not None and hasattr(block, spec.experts) and hasattr(block, spec.router):
                self.layers.append(MoELayer(model, spec, i, block))
        if not self.layers:
            raise MoECompressError(f"{spec.name} model has no MoE layers (every layer is dense); nothing to compress")

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> MoELayer:
        return self.layers[i]

    @property
    def moe_layer_indices(self) -> list[int]:
        return [layer.layer_idx for layer in self.layers]

    @property
    def dense_layer_indices(self) -> list[int]:
        moe = set(self.moe_layer_indices)
        return [i for i in range(self.num_layers) if i not in moe]

    def layer(self, layer_idx: int) -> MoELayer:
        """The MoE layer at decoder index ``layer_idx``."""
        for layer in self.layers:
            if layer.layer_idx == layer_idx:
                return layer
        raise KeyError(f"decoder layer {layer_idx} is not an MoE layer")

    # ----- config ----------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.spec.num_experts_field))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.spec.top_k_field))

    def config_summary(self) -> dict:
        """The routing-related config fields of this family, for reports."""
        s = self.spec
        fields = [s.num_experts_field, s.top_k_field, s.intermediate_field, s.norm_topk_field, s.scaling_field,
                  *(s.group_fields or ()), *s.dense_layer_fields]
        return {f: getattr(self.config, f, None) for f in fields if f}

    def keep_experts(self, keep: dict[int, list[int]]) -> None:
        """Keep ``keep[layer_idx]`` experts in each MoE layer (same count in every layer, so
        that one config field describes the model, as stock transformers and vLLM need)."""
        counts = {len(v) for v in keep.values()}
        if set(keep) != set(self.moe_layer_indices) or len(counts) != 1:
            raise ValueError("keep_experts needs the same number of experts for every MoE layer")
        n = counts.pop()
        for layer in self.layers:
            layer.keep_experts(keep[layer.layer_idx])
        self._set_config_num_experts(n)

    def _set_config_num_experts(self, n: int) -> None:
        s = self.spec
        setattr(self.config, s.num_experts_field, n)
        if self.top_k > n:
            self.set_top_k(n)
        if s.group_fields:
            n_group_f, topk_group_f = s.group_fields
            n_group = getattr(self.config, n_group_f, None) or 1
            # Grouped routing needs E divisible by n_group (and >= 2 experts a group for
            # DeepSeek-V3's top-2-per-group score). Otherwise fall back to one group, which
            # makes group selection a no-op: plain top-k over the kept experts.
            if n_group > 1 and (n % n_group or n // n_group < 2):
                setattr(self.config, n_group_f, 1)
                setattr(self.config, topk_group_f, 1)
                for layer in self.layers:
                    for mod in (layer.router, layer.block):
                        if hasattr(mod, "num_group"):
                            mod.num_group = 1
                        if hasattr(mod, "n_group"):
                            mod.n_group = 1
                        if hasattr(mod, "topk_group"):
                            mod.topk_group = 1

    def set_top_k(self, k: int) -> None:
        setattr(self.config, self.spec.top_k_field, k)
        for layer in self.layers:
            layer.set_top_k(k)

    def set_intermediate_size(self, n: int) -> None:
        setattr(self.config, self.spec.intermediate_field, n)


def moe_view(model: nn.Module) -> MoEModel:
    """The MoE view of a loaded transformers model; a clear error for non-MoE / unknown ones."""
    return MoEModel(model, family_for_config(model.config))
