"""The MoE view over a transformers model: family registry and per-layer views."""

from __future__ import annotations

import contextlib
import importlib
import operator
import pkgutil
from functools import lru_cache

from torch import nn

from ..errors import MoECompressError
from .spec import FamilySpec
from .view import MoELayer, Routing

__all__ = ["FamilySpec", "MoELayer", "MoEModel", "Routing", "registry", "family_for_config", "moe_view",
           "num_groups", "balanced_groups", "stays_grouped", "meta_view"]


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

    @property
    def num_groups(self) -> int:
        """Expert groups of grouped routing (``n_group``), 1 without; see :func:`num_groups`."""
        return num_groups(self.config, self.spec)

    def balanced_groups(self, keep: int) -> int:
        """See :func:`balanced_groups`."""
        return balanced_groups(self.config, self.spec, self.num_experts, keep)

    def keep_experts(self, keep: dict[int, list[int]], edit=None) -> None:
        """Keep ``keep[layer_idx]`` experts in each MoE layer (same count in every layer, so
        that one config field describes the model, as stock transformers and vLLM need).
        ``edit(layer)``, a context manager, wraps each layer's edit (a streamed model's
        ``merge.offload.edited``).

        Grouped routing stays grouped only if every layer kept the same number of experts
        from every group (group g of the kept experts is then group g of the input);
        otherwise the config falls back to one group (plain top-k over the kept experts) and
        :attr:`group_note` says so."""
        counts = {len(v) for v in keep.values()}
        if set(keep) != set(self.moe_layer_indices) or len(counts) != 1:
            raise ValueError("keep_experts needs the same number of experts for every MoE layer")
        n = counts.pop()
        grouped = self.stays_grouped(keep)
        for layer in self.layers:
            with edit(layer) if edit is not None else contextlib.nullcontext():
                layer.keep_experts(keep[layer.layer_idx])
        self._set_config_num_experts(n, grouped=grouped)

    def stays_grouped(self, keep: dict[int, list[int]]) -> bool:
        """See :func:`stays_grouped` (true for every layer's kept list)."""
        return all(stays_grouped(self.config, self.spec, self.num_experts, k) for k in keep.values())

    group_note: str | None = None

    def _set_config_num_experts(self, n: int, grouped: bool = False) -> None:
        s = self.spec
        setattr(self.config, s.num_experts_field, n)
        if self.top_k > n:
            self.set_top_k(n)
        if s.group_fields:
            n_group_f, topk_group_f = s.group_fields
            n_group = getattr(self.config, n_group_f, None) or 1
            # Unbalanced removal leaves groups that mean nothing (and E may not divide):
            # one group makes group selection a no-op, plain top-k over the kept experts.
            if n_group > 1 and not grouped:
                self.group_note = (f"{n_group_f} {n_group} -> 1, {topk_group_f} "
                                   f"{getattr(self.config, topk_group_f, None)} -> 1: the kept experts are not "
                                   f"the same number per group, so routing becomes plain top-k over them")
                setattr(self.config, n_group_f, 1)
                setattr(self.config, topk_group_f, 1)
                for layer in self.layers:
                    layer.route_in_one_group()

    def set_top_k(self, k: int) -> None:
        setattr(self.config, self.spec.top_k_field, k)
        for layer in self.layers:
            layer.set_top_k(k)

    def set_intermediate_size(self, n: int) -> None:
        setattr(self.config, self.spec.intermediate_field, n)


def num_groups(config, spec: FamilySpec) -> int:
    """Expert groups of grouped routing (``n_group``; experts ``g*E/n .. (g+1)*E/n - 1`` form
    group g), 1 for families and configs that route without groups."""
    if not spec.group_fields or getattr(config, "topk_method", None) == "greedy":
        return 1
    return int(getattr(config, spec.group_fields[0], None) or 1)


def balanced_groups(config, spec: FamilySpec, num_experts: int, keep: int) -> int:
    """The group count a pruning that keeps ``keep`` of ``num_experts`` experts balances over:
    ``n_group`` when removing the same number from every group leaves valid grouped routing
    (every group keeps at least ``min_group_size`` and the kept groups can fill top-k), else 1
    (routing then falls back to one group, plain top-k over the kept experts)."""
    n_group = num_groups(config, spec)
    if n_group <= 1 or num_experts % n_group or keep % n_group:
        return 1
    quota = keep // n_group
    topk_group = int(getattr(config, spec.group_fields[1], None) or 1)
    top_k = min(int(getattr(config, spec.top_k_field)), keep)
    return n_group if quota >= spec.min_group_size and top_k <= topk_group * quota else 1


def stays_grouped(config, spec: FamilySpec, num_experts: int, kept: list[int]) -> bool:
    """Whether keeping ``kept`` (in that order) leaves grouped routing meaningful: the same number
    of experts from every group, ascending, so kept group g holds only input group g's experts."""
    n_group = balanced_groups(config, spec, num_experts, len(kept))
    if n_group <= 1 or list(kept) != sorted(kept):
        return False
    size = num_experts // n_group
    counts = [0] * n_group
    for e in kept:
        counts[e // size] += 1
    return len(set(counts)) == 1


def moe_view(model: nn.Module) -> MoEModel:
    """The MoE view of a loaded transformers model; a clear error for non-MoE / unknown ones."""
    return MoEModel(model, family_for_config(model.config))


def meta_view(config) -> MoEModel:
    """The MoE view of a weightless (meta device) model built from ``config``: shapes only."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return MoEModel(model, family_for_config(config))
