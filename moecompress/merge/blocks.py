"""Building merged (or pruned) MoE blocks: one new block per layer, expert ``j`` the merge of a
cluster (a cluster of one expert is that expert, which is how pruning with repair reuses it).

* :func:`merged_expert` — the merged weights of one cluster (optionally neuron-aligned).
* :func:`replace_blocks` — swap every MoE block of a model for its merged block, one layer at a
  time from the onloaded original; a streamed model keeps the new blocks on disk.
* :func:`defer_blocks` — the same swap, each block built only when a layer-wise stage reaches
  its layer (:class:`DeferredBlocks`): a streamed model's new blocks never make a round trip
  through the disk while that stage uses them.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate.utils import set_module_tensor_to_device

from ..arch import MoELayer, moe_view
from ..onload import detached_copy, module_execution_device, onloaded
from .align import match_neurons, member_permutations
from .combine import ExpertWeights, member_weights, merge_weights
from .offload import offload_block, offload_folder_for

if TYPE_CHECKING:
    from .api import Method, MergePlan


@torch.no_grad()
def merged_expert(layer, members: list[int], dominant: int, freq: torch.Tensor, method: Method,
                  perms: dict[int, torch.Tensor] | None = None) -> tuple[ExpertWeights, torch.Tensor]:
    """The merged weights of one cluster and the per-member merge weights; ``perms`` are the
    members' neuron alignments if already solved (:func:`.align.member_permutations`)."""
    w = member_weights(freq, members, method.weights)
    ref = ExpertWeights.read(layer, dominant)
    experts = []
    for e in members:
        x = ExpertWeights.read(layer, e)
        if method.align and e != dominant:
            x = x.permuted(perms[e] if perms is not None else match_neurons(ref, x))
        experts.append(x)
    return merge_weights(experts, w), w


def replace_blocks(model, plan: MergePlan, method: Method, router: str = "dominant",
                   offload_folder: str | os.PathLike | None = None, *,
                   keep_originals: bool = True) -> dict[int, torch.nn.Module]:
    """Replace every MoE block of ``model`` by a new block whose expert ``j`` merges
    ``plan.clusters[li][j]`` (a cluster of one expert is that expert: pruning), and return the
    original blocks (if ``keep_originals``), the re-fit's reference. Blocks are built one layer at a time from the
    (onloaded) original; a streamed model keeps the new blocks on disk (``offload_folder``, a
    temporary folder if not given), like its own layers. The config follows the new count."""
    view = moe_view(model)
    folder = offload_folder_for(model, offload_folder)
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    originals = {}
    for source in view:
        li = source.layer_idx
        block = _merged_block(source, plan.clusters[li], plan.dominant[li], plan.frequency[li], method, router)
        if folder is not None:
            offload_block(block, _block_file(folder, li), module_execution_device(source.block))
        if keep_originals:
            originals[li] = source.block
        setattr(decoder_layers[li], view.spec.moe_block, block)
    _follow_count(model, view, plan)
    return originals


def _follow_count(model, view, plan: MergePlan) -> None:
    """The config (and grouped-routing fields) follow the new expert count; ``view`` is read from
    before the blocks were swapped (whether the kept experts stay grouped)."""
    grouped = view.stays_grouped(plan.dominant)
    moe_view(model)._set_config_num_experts(len(next(iter(plan.dominant.values()))), grouped=grouped)


def _block_file(folder: Path, layer_idx: int) -> Path:
    """Where a streamed model's new block of layer ``layer_idx`` is written."""
    return folder / f"merged-layer-{layer_idx}.safetensors"


class DeferredBlocks:
    """New blocks that are built only when a layer-wise stage reaches their layer. Until then
    the model holds the original block there. ``build(li)`` builds layer li's block from its
    onloaded original (from ``plan.clusters[li]``, which may be filled just before), on the
    execution device, without hooks, swaps it into the model and returns it: the layer's passes
    and edits use it there, as they would use an onloaded block; a view made before the swap
    must take it (``MoELayer.block``). ``done(li)`` then writes a streamed model's block to its
    file and hooks it like :func:`replace_blocks`' blocks (``keep``), or, when the caller will
    not run the model again (the shard surgery has the layer), drops its weights.
    ``finish()`` builds what the stage did not reach and makes the config follow the new count.

    Why: built all at once up front (:func:`replace_blocks`), every new block of a streamed model
    is written to the disk before the stage starts and read back at each of its passes; on the
    OLMoE-1B-7B shape the building alone took 11.1 s of a 73.9 s default prune streamed under
    4 GiB (docs/benchmarks.md, "Session 10"). And a prune that re-fits each layer as soon as its
    experts are chosen (``repair.PruneRepair``) needs the original blocks of the layers after it
    in place, and their config unchanged, while it chooses them: only the built blocks route
    among their experts (``grouped`` false: in one group, as the config will say at the end)."""

    def __init__(self, model, view, plan: "MergePlan", method: "Method", router: str, folder: Path | None,
                 keep: bool, grouped: bool):
        self.model, self.view, self.plan, self.method, self.router = model, view, plan, method, router
        self.folder, self.keep, self.grouped = folder, keep, grouped
        self.decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
        self.pending = {layer.layer_idx: layer for layer in view}
        self.built: dict[int, tuple[torch.nn.Module, torch.device]] = {}

    @torch.no_grad()
    def build(self, layer_idx: int) -> torch.nn.Module | None:
        if layer_idx not in self.pending:
            return None
        source = self.pending.pop(layer_idx)
        li, plan = layer_idx, self.plan
        block = _merged_block(source, plan.clusters[li], plan.dominant[li], plan.frequency[li], self.method, self.router)
        if not self.grouped:
            MoELayer(source.model, source.spec, li, block).route_in_one_group()
        setattr(self.decoder_layers[li], self.view.spec.moe_block, block)
        self.built[li] = (block, module_execution_device(source.block))
        return block

    @torch.no_grad()
    def done(self, layer_idx: int, keep: bool | None = None) -> None:
        """Layer ``layer_idx``'s block is final: written and hooked (``keep``, default the
        builder's; in memory it stays as it is), or dropped."""
        if layer_idx not in self.built:
            return
        block, device = self.built.pop(layer_idx)
        if self.keep if keep is None else keep:
            if self.folder is not None:
                offload_block(block, _block_file(self.folder, layer_idx), device)
        else:
            for name, _ in list(block.named_parameters()):
                set_module_tensor_to_device(block, name, "meta")

    def finish(self) -> None:
        """Every layer the stage did not reach is built (and written to its file: nothing has used
        it yet); any still built is finished; the config follows the new count."""
        for li in sorted(self.built):
            self.done(li)
        for li in sorted(self.pending):
            self.build(li)
            self.done(li, keep=True)
        if self.view.stays_grouped(self.plan.dominant) != self.grouped:
            raise AssertionError("the kept experts do not keep the grouping the blocks were built with")
        _follow_count(self.model, self.view, self.plan)


def defer_blocks(model, plan: MergePlan, method: Method, router: str = "dominant",
                 offload_folder: str | os.PathLike | None = None, *, keep: bool = True,
                 grouped: bool | None = None) -> tuple[dict[int, torch.nn.Module], DeferredBlocks]:
    """:func:`replace_blocks`, each new block built when its layer's turn comes
    (:class:`DeferredBlocks`); returns the original blocks and the deferred builder. The caller
    calls ``build(li)`` before layer li runs, ``done(li)`` when it is final, and ``finish()`` at
    the end. ``plan`` may be filled as the stage goes (``grouped``: whether the kept experts
    will stay grouped, ``MoEModel.stays_grouped``; from the plan if not given). A model in
    memory keeps its built blocks; a streamed one writes them to the offload folder (``keep``)."""
    view = moe_view(model)
    folder = offload_folder_for(model, offload_folder)
    grouped = view.stays_grouped(plan.dominant) if grouped is None else grouped
    originals = {layer.layer_idx: layer.block for layer in view}
    return originals, DeferredBlocks(model, view, plan, method, router, folder, keep, grouped)


@torch.no_grad()
def _merged_block(source, clusters: list[list[int]], dominant: list[int], freq: torch.Tensor, method: Method,
                  router: str) -> torch.nn.Module:
    """A new MoE block for ``source``'s layer whose expert ``j`` is the merge of ``clusters[j]``.

    Everything but the experts and the router's per-expert tensors is copied from the
    onloaded original; those are built at the merged size directly (never a full-size copy).
    Router rule "dominant": expert ``j`` keeps the row (and per-expert router tensors) of
    ``dominant[j]``; "weighted": their average with the expert-merge weights.
    """
    with onloaded(source.block):
        per_expert = [*source.expert_parameters().values(), source.router_weight, *source.router_expert_tensors.values()]
        block = detached_copy(source.block, skip=per_expert, share=[source.model.config])
        target = MoELayer(source.model, source.spec, source.layer_idx, block)
        target.keep_experts(dominant)  # shapes and module counters (the tensors are still meta)
        device = source.router_weight.device
        for module, path in [(target.experts, n) for n in target.expert_parameters()] + \
                [(target.router, "weight")] + [(target.router, p) for p in target.router_expert_tensors]:
            t = operator.attrgetter(path)(module)
            set_module_tensor_to_device(module, path, device, value=torch.empty(t.shape, dtype=t.dtype, device=device))
        rows, row_tensors = source.router_weight.data, source.router_expert_tensors
        perms = member_permutations(source, clusters, dominant) if method.align else None
        for j, (members, dom) in enumerate(zip(clusters, dominant)):
            weights, w = merged_expert(source, members, dom, freq, method, perms)
            weights.write(target, j)
            if router == "weighted":
                target.router_weight.data[j] = (w.to(rows.device)[:, None] * rows[members].double()).sum(0).to(rows.dtype)
                for path, t in row_tensors.items():
                    target.router_expert_tensors[path].data[..., j] = \
                        (w.to(t.device) * t.data[..., members].double()).sum(-1).to(t.dtype)
            else:
                target.router_weight.data[j] = rows[dom]
                for path, t in row_tensors.items():
                    target.router_expert_tensors[path].data[..., j] = t.data[..., dom]
    return block
