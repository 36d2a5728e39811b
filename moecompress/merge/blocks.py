"""Building merged (or pruned) MoE blocks: one new block per layer, expert ``j`` the merge of a
cluster (a cluster of one expert is that expert, which is how pruning with repair reuses it).

* :func:`merged_expert` — the merged weights of one cluster (optionally neuron-aligned).
* :func:`replace_blocks` — swap every MoE block of a model for its merged block, one layer at a
  time from the onloaded original; a streamed model keeps the new blocks on disk.
"""

from __future__ import annotations

import operator
import os
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
            offload_block(block, folder / f"merged-layer-{li}.safetensors", module_execution_device(source.block))
        if keep_originals:
            originals[li] = source.block
        setattr(decoder_layers[li], view.spec.moe_block, block)
    grouped = view.stays_grouped(plan.dominant)  # read before the view sees the merged blocks
    keep = len(next(iter(plan.dominant.values())))
    moe_view(model)._set_config_num_experts(keep, grouped=grouped)  # config (and grouped-routing fields)
    return originals


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
