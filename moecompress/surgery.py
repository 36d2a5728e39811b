"""Checkpoint surgery: remove or replace experts by rewriting safetensors shards, never loading the model.

Pruning a 235B-parameter checkpoint should cost little more than reading the input and
writing the output once. This module copies every tensor of the input shards, dropping the
removed experts' tensors, renumbering the kept ones and slicing router rows and biases, one
shard at a time and one tensor at a time (:mod:`.shardwriter`; memory is bounded by the
largest tensor and one layer's replacements). Replacements may come while the surgery runs
(:class:`SurgeryAlongside`: the re-fit publishes each layer when it is final, and the surgery
writes everything else meanwhile), so the output is written while the GPU works. Kept experts can also receive new
weights (merging computes them): ``replace`` gives, per MoE layer and kept position, the
expert's canonical gate/up/down (and biases) and/or its router row and per-expert router
tensors; every other tensor is still copied from the input.

Key names differ between checkpoints (Mixtral's ``block_sparse_moe.experts.3.w1.weight`` vs
Qwen's ``mlp.experts.3.gate_proj.weight`` vs GPT-OSS's fused ``mlp.experts.gate_up_proj``).
Rather than declaring them per family, we ask transformers: its ``revert_weight_conversion``
(what ``save_pretrained`` uses) is applied to small *probe* tensors whose values are the
expert index, which tells, for every checkpoint key of an MoE layer, which expert it holds or
along which dimension it stacks the experts. A replacement is turned into checkpoint tensors
the same way: it is written, through the MoE view's canonical accessors, into a one-expert
copy of the layer, and ``revert_weight_conversion`` of that copy gives the tensors (per-expert
keys of expert 0, or a slice of width 1 of the fused keys) in the checkpoint's layout.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import formats, mtp
from .background import Background
from .integrity import first_nonfinite_tensor, note_finite_file
from .arch import MoELayer, MoEModel, meta_view  # noqa: F401 (meta_view: re-exported)
from .shardwriter import TORCH_DTYPES, Entry, SafetensorsWriter, aligned_order
from .source import load_config

SHARD_INDEX = "model.safetensors.index.json"
# Replacement parts of one expert: canonical expert weights (one group), router tensors (another).
EXPERT_PARTS = ("gate", "up", "down")  # [I, H], [I, H], [H, I]
BIAS_PARTS = ("gate_bias", "up_bias", "down_bias")  # [I], [I], [H], for families with expert biases
ROUTER_PART = "router"  # the router row [H]; per-expert router tensors are "router.<path>"


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


def _input_shards(src: Path) -> list[Path]:
    if (src / SHARD_INDEX).exists():
        files = sorted(set(json.loads((src / SHARD_INDEX).read_text())["weight_map"].values()))
        return [src / f for f in files]
    return sorted(src.glob("*.safetensors"))


@dataclass(frozen=True)
class _Target:
    """What an input key's place in the output holds: output ``key``; fused keys are sliced to
    the kept experts (``index`` along ``dim``); ``expert`` is the kept position a per-expert key
    now holds, whose tensor is read from input key ``source`` (the kept expert, maybe in another
    shard; unknown, ``None``, when the plan was made from the kept count: a replacement comes);
    ``k0`` names the tensor in a one-expert revert (where replacements are looked up)."""
    key: str
    layer: int
    index: torch.Tensor | None = None
    dim: int | None = None
    expert: int | None = None
    k0: str | None = None
    source: str | None = None


def _part_views(layer: MoELayer, j: int, *, experts: bool, router: bool) -> dict[str, torch.Tensor]:
    """Expert ``j``'s replacement parts as views of the layer's tensors (no copies)."""
    parts: dict[str, torch.Tensor] = {}
    if experts:
        parts.update(zip(EXPERT_PARTS, (layer.gate_proj[j], layer.up_proj[j], layer.down_proj[j])))
        parts.update((name, b[j]) for name, b in zip(BIAS_PARTS, layer.expert_biases) if b is not None)
    if router:
        parts[ROUTER_PART] = layer.router_weight[j]
        parts.update((f"{ROUTER_PART}.{path}", t[..., j]) for path, t in layer.router_expert_tensors.items())
    return {k: v.detach() for k, v in parts.items()}


def layer_parts(layer: MoELayer, j: int, *, experts: bool = True, router: bool = False,
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Expert ``j`` of a loaded MoE layer as replacement parts (copies in the layer's dtype, on
    ``device`` or the layer's): its canonical weights (``experts``) and/or its router row and
    per-expert router tensors (``router``). Offloaded weights must be onloaded
    (``onload.onloaded``)."""
    parts = _part_views(layer, j, experts=experts, router=router)
    return {k: v.to(device, copy=True) if device is not None else v.clone() for k, v in parts.items()}


class ModelReplacements:
    """``replace`` for :func:`prune_checkpoint_files`, read from the MoE layers of a loaded model
    (onloaded one layer at a time if it is streamed, copied to the CPU): ``groups[layer_idx][j]``
    says what kept expert ``j`` replaces, ``{"experts"}``, ``{"router"}`` or both."""

    def __init__(self, view: MoEModel, groups: dict[int, dict[int, set[str]]]):
        self.view, self.groups = view, groups

    @property
    def layers(self) -> list[int]:
        """The layers that get replacements (the surgery writes their tensors in this order)."""
        return [li for li, g in self.groups.items() if any(g.values())]

    def get(self, layer_idx: int, default=None):
        wanted = {j: set(g) for j, g in self.groups.get(layer_idx, {}).items() if g}
        if not wanted:
            return default
        from .onload import onloaded

        layer = self.view.layer(layer_idx)
        with onloaded(layer.block):
            return {j: layer_parts(layer, j, experts="experts" in g, router="router" in g, device="cpu")
                    for j, g in sorted(wanted.items())}


class Cancelled(Exception):
    """The work a surgery ran beside stopped; the surgery stops too."""


class PublishedReplacements:
    """``replace`` for a surgery that runs beside the work producing the replacements (the
    re-fit, a layer at a time; :class:`SurgeryAlongside`): ``groups`` as for
    :class:`ModelReplacements`. The worker calls :meth:`publish` when a layer is final (its
    weights onloaded): the parts are copied to pinned CPU memory without waiting. The surgery's
    :meth:`get` waits until its layer is published (and its copies done), and :meth:`release`
    drops a layer once its last shard is written, so about one layer's parts are held at a time."""

    def __init__(self, groups: dict[int, dict[int, set[str]]], kept: dict[int, list[int]] | None = None):
        self.groups = {li: {j: set(g) for j, g in d.items() if g} for li, d in groups.items()}
        self.layers = [li for li, d in self.groups.items() if d]
        # filled by the worker as it chooses each layer's experts, before it publishes the layer: a
        # surgery that starts before they are chosen (given their count) reads them here (kept)
        self._kept = kept
        self._ready: dict[int, tuple[dict, object]] = {}
        self._published: set[int] = set()
        self._cond = threading.Condition()
        self.cancelled = False
        self.error: BaseException | None = None  # the surgery's, raised to the worker at its next publish

    def publish(self, layer: MoELayer) -> None:
        from .capture import moved

        if self.error is not None:
            raise self.error
        wanted = self.groups.get(layer.layer_idx)
        if not wanted or layer.layer_idx in self._published:
            return
        parts, event = {}, None
        for j, g in sorted(wanted.items()):
            views = _part_views(layer, j, experts="experts" in g, router="router" in g)
            parts[j] = {k: moved(v, torch.device("cpu")) if v.is_cuda else v.clone() for k, v in views.items()}
            if event is None and any(v.is_cuda for v in views.values()):
                event = torch.cuda.Event()
        if event is not None:  # after the copies: the surgery waits for it, the worker does not
            event.record()
        with self._cond:
            self._ready[layer.layer_idx] = (parts, event)
            self._published.add(layer.layer_idx)
            self._cond.notify_all()

    def publish_rest(self, view: MoEModel) -> None:
        """Publish every layer of ``view`` not published yet (onloaded one at a time), so a
        surgery never waits for a layer the worker left alone."""
        from .onload import onloaded

        for li in self.layers:
            if li not in self._published:
                layer = view.layer(li)
                with onloaded(layer.block):
                    self.publish(layer)

    def get(self, layer_idx: int, default=None):
        if not self.groups.get(layer_idx):
            return default
        with self._cond:
            while layer_idx not in self._ready and not self.cancelled:
                self._cond.wait()
            if self.cancelled:
                raise Cancelled()
            parts, event = self._ready[layer_idx]
        if event is not None:
            event.synchronize()
        return parts

    def kept(self, layer_idx: int) -> list[int]:
        """Layer ``layer_idx``'s kept experts (asked for after :meth:`get` returned)."""
        if self._kept is None or layer_idx not in self._kept:
            raise ValueError(f"the kept experts of layer {layer_idx} were not given with its replacements")
        return list(self._kept[layer_idx])

    def release(self, layer_idx: int) -> None:
        with self._cond:
            self._ready.pop(layer_idx, None)

    def cancel(self) -> None:
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()


class SurgeryAlongside:
    """``with SurgeryAlongside(write, replace): work()``: the surgery ``write()`` (reading its
    replacements from ``replace``, a :class:`PublishedReplacements`) runs in a thread while the
    body produces them, so the output is written while the GPU works instead of after it. On
    leaving, the thread is joined: the body's exception cancels the surgery and is raised; the
    surgery's exception is raised (and stops the body at its next ``publish``)."""

    def __init__(self, write, replace: PublishedReplacements):
        self.write, self.replace = write, replace
        self.job: Background | None = None

    @property
    def thread(self) -> threading.Thread:
        return self.job.thread

    def _write(self, stop) -> None:  # (stop: the thread is always joined on leaving, before any exit)
        try:
            self.write()
        except BaseException as e:  # the worker's next publish raises it (Cancelled: the worker stopped first)
            self.replace.error = e
            raise

    def __enter__(self) -> "SurgeryAlongside":
        self.job = Background(self._write, "moecompress-surgery")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.replace.cancel()
            self.job.thread.join()
        else:
            self.job.result()


class _OneExpert:
    """A one-expert, materialised copy of a (meta) MoE layer: replacement parts are written
    into it through the canonical accessors, ``revert_weight_conversion`` gives them in the
    checkpoint's layout (per-expert keys of expert 0, fused keys of width 1)."""

    def __init__(self, model, layer: MoELayer):
        self.model = model
        self.layer = MoELayer(model, layer.spec, layer.layer_idx, copy.deepcopy(layer.block))
        self.layer.keep_experts([0])
        self.prefix = f"{layer.spec.layers_path}.{layer.layer_idx}.{layer.spec.moe_block}."
        biases = self.layer.expert_biases[0] is not None
        self.expert_names = EXPERT_PARTS + (BIAS_PARTS if biases else ())
        self.router_names = (ROUTER_PART, *(f"{ROUTER_PART}.{p}" for p in self.layer.router_expert_tensors))
        self.dtype = None

    def _materialise(self, dtype: torch.dtype) -> None:
        if self.dtype != dtype:  # only the experts and the router: shared experts stay on meta
            for mod in (self.layer.experts, self.layer.router):
                mod.to_empty(device="cpu")
                mod.to(dtype)
            self.dtype = dtype

    def _groups(self, parts: Mapping[str, torch.Tensor]) -> tuple[bool, bool]:
        unknown = sorted(set(parts) - set(self.expert_names) - set(self.router_names))
        if unknown:
            raise ValueError(f"unknown replacement part(s) {unknown}; this layer takes "
                             f"{list(self.expert_names)} and/or {list(self.router_names)}")
        given = []
        for names in (self.expert_names, self.router_names):
            missing = [n for n in names if n not in parts]
            if len(missing) not in (0, len(names)):
                raise ValueError(f"a replacement must give all of {list(names)} or none; missing {missing}")
            given.append(not missing)
        return given[0], given[1]

    @torch.no_grad()
    def revert(self, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from transformers.core_model_loading import revert_weight_conversion

        experts, router = self._groups(parts)
        self._materialise(torch.float64 if any(t.dtype == torch.float64 for t in parts.values()) else torch.float32)
        layer, spec, state = self.layer, self.layer.spec, {}
        if experts:
            views = dict(zip(EXPERT_PARTS, (layer.gate_proj[0], layer.up_proj[0], layer.down_proj[0])))
            views.update((n, b[0]) for n, b in zip(BIAS_PARTS, layer.expert_biases) if b is not None)
            for name, view in views.items():
                _copy_part(view, parts[name], name)
            state.update({f"{self.prefix}{spec.experts}.{n}": p.data for n, p in layer.experts.named_parameters(recurse=False)})
        if router:
            _copy_part(layer.router_weight.data[0], parts[ROUTER_PART], ROUTER_PART)
            state[f"{self.prefix}{spec.router}.weight"] = layer.router_weight.data
            for path, t in layer.router_expert_tensors.items():
                _copy_part(t.data[..., 0], parts[f"{ROUTER_PART}.{path}"], f"{ROUTER_PART}.{path}")
                state[f"{self.prefix}{spec.router}.{path}"] = t.data
        return {k: v.clone() for k, v in revert_weight_conversion(self.model, state).items()}


def _copy_part(view: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(view.shape):
        raise ValueError(f"replacement part '{name}' has shape {tuple(value.shape)}, the layer needs {tuple(view.shape)}")
    view.copy_(value)


class _Replacements:
    """The checkpoint-layout tensors of one layer's replacements at a time (shards list a
    layer's keys together, so each layer is converted about once per shard it spans)."""

    def __init__(self, replace, keep: dict[int, list[int]] | int, new: MoEModel):
        self.replace, self.keep, self.new = replace, keep, new
        # the plan was made from the kept count (prune_checkpoint_files): every per-expert key's
        # position holds a replacement, and a fused key is sliced to the kept set the replacements name
        self.from_count = isinstance(keep, int)
        self.layer_idx: int | None = None
        self.pieces: dict[int, dict[str, torch.Tensor]] = {}

    def kept(self, layer_idx: int) -> list[int]:
        """Layer ``layer_idx``'s kept experts: given, or (a count was given) from the
        replacements, once :meth:`of` has their layer."""
        return self.replace.kept(layer_idx) if self.from_count else self.keep[layer_idx]

    def of(self, layer_idx: int) -> dict[int, dict[str, torch.Tensor]]:
        if self.replace is None:
            return {}
        if layer_idx != self.layer_idx:
            self.layer_idx, self.pieces = layer_idx, {}
            given = self.replace.get(layer_idx) or {}
            n = self.keep if self.from_count else len(self.keep[layer_idx])
            bad = [j for j in given if not 0 <= j < n]
            if bad:
                raise ValueError(f"replacements for experts {bad} of layer {layer_idx}, which keeps {n} (positions 0..{n - 1})")
            if given:
                one = _OneExpert(self.new.model, self.new.layer(layer_idx))
                self.pieces = {j: one.revert(parts) for j, parts in sorted(given.items())}
        return self.pieces

    def release(self, layer_idx: int) -> None:
        """Layer ``layer_idx`` is written: its pieces (and a lazy source's parts) are dropped."""
        if self.layer_idx == layer_idx:
            self.layer_idx, self.pieces = None, {}
        if hasattr(self.replace, "release"):
            self.replace.release(layer_idx)


def _plan(old: MoEModel, new: MoEModel, keep: dict[int, list[int]], chosen: bool = True) -> dict[str, list[_Target]]:
    """Input checkpoint key -> where it goes, for the routed-expert and router keys. ``keep``
    may also name stored MTP layers (``mtp.py``): they are planned like the last MoE layer,
    whose shape they have. ``chosen=False``: ``keep`` stands for the kept count only."""
    plan: dict[str, list[_Target]] = {}
    last = old.moe_layer_indices[-1]
    extra = [i for i in keep if i not in old.moe_layer_indices]
    for layer_old, layer_new in zip(old, new):
        old_roles = checkpoint_roles(old.model, layer_old, layer_old.num_experts)
        new_roles = checkpoint_roles(new.model, layer_new, len(keep[layer_old.layer_idx]))
        for li in [layer_old.layer_idx] + (extra if layer_old.layer_idx == last else []):
            renamed = {mtp.rename_layer(k, li): r for k, r in new_roles.items()}
            _plan_layer(plan, li, keep[li] if chosen else None, len(keep[li]),
                        {mtp.rename_layer(k, li): r for k, r in old_roles.items()}, renamed)
    return plan


def _plan_layer(plan: dict, li: int, kept: list[int] | None, count: int, old_roles: dict[str, KeyRole],
                new_roles: dict[str, KeyRole]) -> None:
    """Layer ``li``'s keys, keeping ``kept`` (``None``: ``count`` experts not chosen yet).

    A per-expert key's place depends on the count only: kept position ``j`` is written where the
    input stores expert ``j`` (same name, same shard) and holds kept expert ``kept[j]``'s tensor.
    So the output's layout is the same whether the plan is made from the kept sets or, before
    they are chosen, from their count (a re-fit beside the surgery): the same bytes either way,
    also where a layer's experts span two shards."""
    new_by_expert = {(r.expert, r.slot): k for k, r in new_roles.items() if r.expert is not None}
    old_by_expert = {(r.expert, r.slot): k for k, r in old_roles.items() if r.expert is not None}
    index = torch.tensor(kept if kept is not None else range(count), dtype=torch.long)
    for key, role in old_roles.items():
        if role.expert_dim is not None:  # fused: slice along the expert dimension
            plan[key] = [_Target(key, li, index=index, dim=role.expert_dim, k0=key)]
        elif role.expert < count:  # per-expert: this place holds kept position role.expert
            j = role.expert
            new_key = new_by_expert[(j, role.slot)]
            assert re.sub(r"\d+", "#", new_key) == re.sub(r"\d+", "#", key), (key, new_key)
            source = old_by_expert[(kept[j], role.slot)] if kept is not None else None
            plan[key] = [_Target(new_key, li, expert=j, k0=new_by_expert[(0, role.slot)], source=source)]
        else:
            plan[key] = []  # a place past the kept count


def _surgery_plan(src: Path, keep: dict[int, list[int]] | int, drop_mtp: bool):
    """(plan, the pruned meta view, the stored MTP layers, the quantization method) of pruning
    ``src`` to ``keep`` (per layer, or a count: the first ``keep`` experts of every MoE and
    stored MTP layer, for shapes only): where every routed-expert and router key goes."""
    config = load_config(src)
    old = meta_view(config)
    stored_mtp = set(mtp.stored_layers(src, config))
    chosen = not isinstance(keep, int)
    if not chosen:
        keep = {li: list(range(keep)) for li in [*old.moe_layer_indices, *sorted(stored_mtp)]}
    new_config = type(config).from_dict(config.to_dict())
    new = meta_view(new_config)
    new.keep_experts({layer.layer_idx: list(keep[layer.layer_idx]) for layer in new})  # meta: shapes and config
    if drop_mtp:
        new.model.config.num_nextn_predict_layers = 0
    elif stored_mtp - set(keep):
        raise ValueError(f"the checkpoint stores MTP layer(s) {sorted(stored_mtp - set(keep))}: give their kept experts "
                         "(mtp.kept_by_own_router) or drop them")
    plan = _plan(old, new, {li: k for li, k in keep.items() if li in old.moe_layer_indices or
                            (li in stored_mtp and not drop_mtp)}, chosen)
    return plan, new, stored_mtp, formats.quant_method(config)


def pruned_tensor_bytes(src: Path, keep: int, *, drop_mtp: bool = False) -> int:
    """Bytes of the tensors :func:`prune_checkpoint_files` writes when every MoE (and stored
    MTP) layer keeps ``keep`` experts: the shapes depend on the count only, so they come from
    the shard headers with any ``keep`` experts, before anything is chosen or read."""
    plan, _, stored_mtp, method = _surgery_plan(src, keep, drop_mtp)
    total = 0
    for shard in _input_shards(src):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                if not (drop_mtp and mtp.layer_of(key) in stored_mtp):
                    total += sum(_entry(f, key, target).nbytes for target in _targets(plan, key, method))
    return total


def prune_checkpoint_files(src: Path, out: Path, keep: dict[int, list[int]] | int, progress=None, *,
                           replace: Mapping[int, Mapping[int, Mapping[str, torch.Tensor]]] | None = None,
                           drop_mtp: bool = False) -> None:
    """Write into ``out`` the shards and config of ``src`` with only ``keep[layer]`` experts.

    The kept count must be the same in every MoE layer (one config field describes it).
    ``keep`` may be that count while the experts are still being chosen: then ``replace`` (a
    :class:`PublishedReplacements` given the kept sets) replaces every expert part of every MoE
    layer, and names each layer's kept experts (``kept``) when it publishes the layer: the
    surgery plans the output from the count and slices each layer's router when it gets there.

    ``replace`` gives kept experts new weights: ``replace.get(layer_idx)`` is ``None`` or
    ``{j: parts}`` for kept position ``j`` (input expert ``keep[layer_idx][j]``), ``parts`` in
    the canonical layout with all of :data:`EXPERT_PARTS` (and :data:`BIAS_PARTS` where the
    family has expert biases) and/or :data:`ROUTER_PART` with every ``"router.<path>"`` of the
    family's per-expert router tensors. A dict works, or any object with ``get`` (called per
    layer and shard, so it can load lazily: :class:`ModelReplacements`, or wait for them:
    :class:`PublishedReplacements`). Values are cast to the dtype the input stores; everything
    not replaced is copied from the input. In each shard the replaced layers' tensors come last,
    in the order of ``replace.layers`` (a dict's keys), the rest first; a ``replace`` with
    ``release`` is told when a layer is written, and one whose ``cancelled`` turns true stops
    the surgery (:class:`Cancelled`).

    The output keeps the input's layout: a per-expert checkpoint's kept position ``j`` is
    stored where the input stores expert ``j`` (``_plan_layer``), so the shards and their index
    depend on the kept count only, not on which experts are kept or when they were chosen.

    Multi-token-prediction layers the checkpoint stores (``mtp.py``) need their kept experts in
    ``keep`` too (their own choice: ``mtp.kept_by_own_router``), or ``drop_mtp``: their tensors
    are left out and ``num_nextn_predict_layers`` becomes 0.
    """
    plan, new, stored_mtp, method = _surgery_plan(src, keep, drop_mtp)
    if replace is not None and method is not None:
        raise ValueError(f"replacing experts of a {method} checkpoint by surgery would store new weights with old "
                         "scales; stages that rewrite weights save a dequantized (bf16) model instead")
    if isinstance(keep, int) and (stored_mtp and not drop_mtp or not isinstance(replace, PublishedReplacements)
                  or set(replace.layers) != set(new.moe_layer_indices)
                  or any(set(g) != set(range(keep)) or not {"experts"} <= set.intersection(*g.values())
                         for g in replace.groups.values())):
        raise ValueError("a kept count needs published replacements of every expert of every MoE layer")
    replacements = _Replacements(replace, keep, new)

    shards = _input_shards(src)
    # Tensors of the layers that get replacements are written last, a layer at a time in the
    # order the replacements come (a surgery beside the re-fit writes everything else while it
    # runs); a layer's replacements are released after the last shard that holds it.
    rank = {li: i for i, li in enumerate(_replaced_layers(replace))}
    shard_jobs = []  # per shard: output key -> (input key, target), planned once from its header
    last_shard = {}
    reader = _Sources()
    for i, shard in enumerate(shards):
        with safe_open(shard, framework="pt") as f:
            jobs = {}
            for key in f.keys():
                reader.where[key] = shard
                if drop_mtp and mtp.layer_of(key) in stored_mtp:
                    continue
                for target in _targets(plan, key, method):
                    jobs[target.key] = (key, target)
                    if target.layer in rank:
                        last_shard[target.layer] = i
        shard_jobs.append(jobs)
    weight_map: dict[str, str] = {}
    total = 0
    with reader:
        for i, (shard, jobs) in enumerate(zip(shards, shard_jobs)):
            with safe_open(shard, framework="pt") as f:
                metadata = f.metadata()
                entries = sorted((_entry(f, key, target) for key, target in jobs.values()),
                                 key=lambda e: (rank.get(jobs[e.name][1].layer, -1), e.name))
                entries = aligned_order(entries)  # deterministic: it depends on the plan only
                if entries or len(shards) == 1:  # a shard that held only dropped MTP tensors is not written
                    finite = True
                    with SafetensorsWriter(out / shard.name, entries, metadata or {"format": "pt"}) as w:
                        for e in entries:
                            if getattr(replace, "cancelled", False):
                                raise Cancelled()
                            t = _output_tensor(f, *jobs[e.name], replacements,
                                               lambda key, f=f, shard=shard: reader.get_tensor(f, shard, key))
                            # scanned here, in memory: the output check need not read the file
                            finite = finite and first_nonfinite_tensor({e.name: t}) is None
                            w.write(e.name, t)
                    if finite:
                        note_finite_file(out / shard.name)
            for li in [li for li, last in last_shard.items() if last == i]:
                replacements.release(li)
            total += sum(e.nbytes for e in entries)
            weight_map.update({e.name: shard.name for e in entries})
            if progress is not None:
                progress(shard)
    if (src / SHARD_INDEX).exists():
        index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / SHARD_INDEX).write_text(json.dumps(index_json, indent=2) + "\n")
    if replacements.from_count:  # the config's grouped routing follows the kept sets, known by now
        new = _surgery_plan(src, {li: replacements.kept(li) for li in new.moe_layer_indices}, drop_mtp)[1]
    new.model.config.save_pretrained(out)
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copyfile(src / extra, out / extra)


class _Sources:
    """Input tensors by key, from whichever shard holds them: a kept expert's tensor may sit in
    another shard than its place in the output (``_plan_layer``). Those shards are opened once."""

    def __init__(self):
        self.where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    def get_tensor(self, f, shard: Path, key: str) -> torch.Tensor:
        """Input ``key``, read through ``f`` (the open ``shard``) where that shard holds it."""
        other = self.where[key]
        if other == shard:
            return f.get_tensor(key)
        if other not in self._open:
            self._open[other] = self._stack.enter_context(safe_open(other, framework="pt"))
        return self._open[other].get_tensor(key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._open.clear()
        self._stack.close()


def _targets(plan: dict[str, list[_Target]], key: str, method: str | None) -> list[_Target]:
    """Where input ``key`` goes. A quantized tensor's parts (FP8 block scales, MXFP4 blocks and
    scales) follow the plan of the tensor they quantize: the same expert renamed or dropped,
    or the same slice along the expert dimension (dim 0 for MXFP4, as for the fused tensor),
    so kept experts stay bit-identical in their stored format."""
    if key in plan:
        return plan[key]
    logical, part = formats.logical_key(key, method)
    if part == "weight" or logical not in plan:
        return [_Target(key, -1)]
    return [dataclasses.replace(t, key=formats.stored_key(t.key, part), expert=None, k0=None,
                                source=t.source and formats.stored_key(t.source, part)) for t in plan[logical]]


def _replaced_layers(replace) -> list[int]:
    """The layers ``replace`` gives replacements for, in the order they become available."""
    if replace is None:
        return []
    if isinstance(replace, Mapping):
        return [li for li, given in replace.items() if given]
    return list(getattr(replace, "layers", []))


def _entry(f, key: str, target: _Target) -> Entry:
    """The output tensor's name, stored dtype and shape (fused keys: the kept experts only)."""
    sl = f.get_slice(key)
    shape = list(sl.get_shape())
    if target.index is not None:
        shape[target.dim] = target.index.numel()
    return Entry(target.key, sl.get_dtype(), tuple(shape))


def _output_tensor(f, key: str, target: _Target, replacements: _Replacements, read) -> torch.Tensor:
    """The tensor written at input ``key``'s place: a replacement, or ``read(input key)`` of the
    tensor the place holds (``target.source``, maybe in another shard), sliced if fused."""
    if target.expert is not None:  # per-expert key: the replacement, or the kept expert's input tensor
        piece = replacements.of(target.layer).get(target.expert, {}).get(target.k0)
        if piece is None:
            if target.source is None:
                raise ValueError(f"no replacement for '{key}', planned from the kept count")
            return read(target.source)
        dtype = TORCH_DTYPES.get(f.get_slice(key).get_dtype()) or f.get_tensor(key).dtype
        return piece.to(dtype).contiguous()
    t = read(target.source or key)
    if target.index is None:
        return t
    pieces_of = replacements.of(target.layer)  # waits for a published layer (and its kept set)
    index = torch.tensor(replacements.kept(target.layer), dtype=torch.long) if replacements.from_count else target.index
    t = t.index_select(target.dim, index).contiguous()
    for j, pieces in pieces_of.items():
        if target.k0 in pieces:
            t.narrow(target.dim, j, 1).copy_(pieces[target.k0])
    return t
