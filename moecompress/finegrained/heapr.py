"""HEAPr: second-order importance of atomic experts, measured in the expert's output space.

Li et al., "HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space" (ICLR 2026,
arXiv:2509.22299, code https://github.com/LLIKKE/HEAPr). An expert is a sum of *atomic experts*,
one per intermediate neuron k::

    E_i(x) = sum_k e_k(x),   e_k(x) = d_k * a_k(x),   a_k(x) = act(gate_k . x) * (up_k . x)

(``gate_k``/``up_k`` rows of the gate/up projections, ``d_k`` the k-th column of the down
projection, E_i the expert's own output, before the routing weight). Cross-atom second
derivatives vanish, so the OBS expansion is block-diagonal over atoms; the paper then rewrites
"remove atom k" as "zero its output" and approximates the Hessian of the loss with respect to
the expert output by the Fisher matrix (gradient covariance). Its two-stage estimate is::

    G_i = 1/|T_i| * sum_{x in T_i} g_i(x) g_i(x)^T,      g_i(x) = dl/dE_i(x) = w_i(x) dl/dy(x)   (stage 1)
    s_k = 1/|T_i| * sum_{x in T_i} 1/2 * e_k(x)^T G_i e_k(x)                                   (stage 2)

with ``T_i`` the calibration tokens routed to expert i, ``w_i(x)`` its routing weight and y the
MoE block output; ``s_k`` is compared globally, across experts and layers. Because the atom
output factorises as ``d_k a_k(x)``::

    s_k = 1/2 * (d_k^T G_i d_k) * mean_{x in T_i} a_k(x)^2
        = 1/2 * [1/|T_i| sum_x (g_i(x) . d_k)^2] * [1/|T_i| sum_x a_k(x)^2]

which we evaluate without materialising G_i (memory O(E x I) per layer instead of O(E x d^2);
the numbers are identical, see ``tests/test_finegrained.py``, which builds G_i explicitly and
averages the quadratic form token by token). Both averages run over the expert's own routed
tokens, so the score is the expected loss increase *per routed token*, not summed over the
calibration set (an earlier version here summed the second factor, which weighted frequently
routed experts by their token count; that changed only the global ranking). The paper's two
forward passes and one backward pass (stage 1, then stage 2 with G_i fixed) collapse into one
forward and one backward pass here, since ``a_k`` only needs the forward activations.

Source checked: the paper's full text could not be retrieved offline (only its abstract,
arXiv HTML v1/v2); the two formulas above are as transcribed in the paper note
https://en.papernotes.org/ICLR2026/model_compression/heapr_hessian-based_efficient_atomic_expert_pruning_in_output_space/
("Efficient Two-stage Estimation"; the note cites the OBS constraint as the paper's Formula 2 but
gives no numbers for these two, so none are quoted here). The authors' released code
(LLIKKE/HEAPr, ``pruning/pruning_global.py``) only loads precomputed scores and ranks them
globally over all layers (defaults: 128 WikiText calibration samples, batch 1); it does not
contain the score computation, so the formula itself is not verified against code.

Pruning and storage. The paper ranks atoms globally. Stock transformers (and vLLM) describe
every expert of every layer with one ``moe_intermediate_size``, so the default here keeps the
same number of atoms in every expert, each expert keeping its own highest-scoring atoms
(``MoELayer.keep_neurons`` + ``MoEModel.set_intermediate_size``): a real, loadable size
reduction (per-expert ranking is unaffected by the 1/|T_i| normalisation). Families that size
their shared expert from the same config field (DeepSeek, GLM-4.5, ERNIE, Llama-4) get their
shared expert shrunk to the size the new config implies, keeping its highest-scoring atoms by the
same criterion over every token (see ``conform_shared_experts``). The paper's global ranking is
offered only as ``global_ranking=True``, which writes zeros into the pruned atoms' weights and
saves no memory at all.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..arch import MoEModel, moe_view
from ..capture import batches_of, execution_device
from ..errors import MoECompressError
from ..merge.offload import layer_editor
from ..onload import is_streamed
from ._layerwise import layerwise_block_grads, lm_loss
from ._routing import routed_tokens


@dataclass
class _Sums:
    """Running sums of one layer: sum_t (g_t . d_k)^2, sum_t a_k(t)^2 and the token count,
    for the routed experts ([E, I], [E, I], [E]) and the shared expert(s) ([I_s], [I_s], []).
    ``scores`` turns both sums into means over the expert's routed tokens (s_k above)."""

    q: torch.Tensor
    energy: torch.Tensor
    counts: torch.Tensor
    shared_q: torch.Tensor | None = None
    shared_energy: torch.Tensor | None = None
    shared_count: int = 0

    def scores(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.counts.clamp(min=1)[:, None]
        routed = 0.5 * (self.q / n) * (self.energy / n)  # 1/2 d_k^T G_i d_k * mean_{T_i} a_k^2
        if self.shared_q is None:
            return routed.cpu(), None
        ns = max(1, self.shared_count)
        return routed.cpu(), (0.5 * (self.shared_q / ns) * (self.shared_energy / ns)).cpu()


def shared_mlp_parts(layer) -> tuple[nn.Linear, nn.Linear, nn.Linear, object] | None:
    """(gate, up, down, act) of a layer's shared-expert MLP, or None."""
    mlp = layer.shared_experts
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn")
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj, act


@torch.no_grad()
def _accumulate(layer, x, routing, grad, sums: _Sums) -> None:
    """Add one batch's terms of S_{e,k} for one layer: (g . d_k)^2 and a_k^2 per routed token."""
    g = grad.reshape(-1, grad.shape[-1]).float()
    down = layer.down_proj
    for et in routed_tokens(layer, x, routing):
        ge = g[et.tok] * et.out_scale[:, None]  # dL/dE_e(x_t): gradient w.r.t. the expert's own output
        sums.q[et.e] += (ge @ down[et.e].float()).square().sum(0)
        sums.energy[et.e] += layer.expert_hidden(et.e, et.x_in).float().square().sum(0)
        sums.counts[et.e] += et.tok.numel()
    if sums.shared_q is not None:  # the shared expert's atoms, same criterion (every token, weight 1 or its gate)
        gate, up, dn, act = shared_mlp_parts(layer)
        a = (act(gate(x)) * up(x)).float()
        gs = g if layer.shared_expert_gate is None else g * torch.sigmoid(layer.shared_expert_gate(x)).float()
        sums.shared_q += (gs @ dn.weight.float()).square().sum(0)
        sums.shared_energy += a.square().sum(0)
        sums.shared_count += x.shape[0]


def heapr_scores(model, tokens: torch.Tensor, *, batch_size: int = 8, view: MoEModel | None = None,
                 progress: bool = True, layer_by_layer: bool | None = None) -> dict[int, torch.Tensor]:
    """HEAPr importance ``S[e, k]`` of every atomic expert, per MoE layer index -> [E, I] float32.

    One forward and one backward pass of the language-modelling loss (summed over tokens) on
    ``tokens`` [N, S]; the model's weights are not changed and need no gradient.
    ``layer_by_layer`` (default: for a streamed model) computes the same gradients one decoder
    layer at a time (``_layerwise.py``), so that the GPU holds one layer.
    """
    return {i: routed for i, (routed, _) in _all_scores(model, tokens, batch_size, view or moe_view(model),
                                                         progress, shared=False, layer_by_layer=layer_by_layer).items()}


def _all_scores(model, tokens, batch_size, view: MoEModel, progress: bool, shared: bool,
                layer_by_layer: bool | None = None):
    """{layer_idx: (routed scores [E, I], shared-expert scores [I_s] or None)}."""
    device = execution_device(model)
    sums = {}
    for layer in view:
        E, inter = layer.num_experts, layer.intermediate_size
        sums[layer.layer_idx] = _Sums(torch.zeros(E, inter, device=device), torch.zeros(E, inter, device=device),
                                      torch.zeros(E, device=device))
        parts = shared_mlp_parts(layer) if shared else None
        if parts is not None:
            n = parts[2].weight.shape[1]
            sums[layer.layer_idx].shared_q = torch.zeros(n, device=device)
            sums[layer.layer_idx].shared_energy = torch.zeros(n, device=device)
    if layer_by_layer if layer_by_layer is not None else is_streamed(model):
        def visit(layer, x, routing, grad):
            _accumulate(layer, x, routing, grad, sums[layer.layer_idx])

        layerwise_block_grads(model, tokens, visit, batch_size=batch_size, view=view, progress=progress)
        return {i: s.scores() for i, s in sums.items()}
    chunks = batches_of(tokens, batch_size)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task("HEAPr gradients", total=len(chunks))
        for chunk in chunks:
            _one_batch(model, view, chunk.to(device), sums)
            bar.advance(task)
    return {i: s.scores() for i, s in sums.items()}


def _one_batch(model, view: MoEModel, ids: torch.Tensor, sums: dict[int, _Sums]) -> None:
    routings, seen = {}, []
    hooks = []

    def leaf_embeddings(mod, inp, out):
        # The weights need no gradient; making the embedding output require one builds the
        # graph from there on, so dL/dy reaches every MoE block output through every path.
        return out if out.requires_grad else out.detach().requires_grad_(True)

    hooks.append(model.get_input_embeddings().register_forward_hook(leaf_embeddings))
    for layer in view:
        def on_router(mod, inp, out, layer=layer):
            with torch.no_grad():
                routings[layer.layer_idx] = layer.routing_from_router_output(
                    tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out))

        def on_block(mod, inp, out, layer=layer):
            y = out[0] if isinstance(out, tuple) else out
            x = inp[0].detach().reshape(-1, inp[0].shape[-1])
            seen.append((layer, x, routings.pop(layer.layer_idx), y))

        hooks.append(layer.router.register_forward_hook(on_router))
        hooks.append(layer.block.register_forward_hook(on_block))
    try:
        with torch.enable_grad():
            loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            grads = torch.autograd.grad(loss, [y for *_, y in seen])
    finally:
        for h in hooks:
            h.remove()
    for (layer, x, routing, _), grad in zip(seen, grads):
        _accumulate(layer, x, routing, grad, sums[layer.layer_idx])


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise MoECompressError(f"--ratio must be in [0, 1) for heapr (the fraction of atomic experts to remove), got {ratio}")


@torch.no_grad()
def heapr_prune(model, tokens: torch.Tensor, ratio: float, *, global_ranking: bool = False, align: int = 8,
                batch_size: int = 8, scores: dict[int, torch.Tensor] | None = None, progress: bool = True,
                offload_folder=None) -> dict:
    """Remove the fraction ``ratio`` of atomic experts (intermediate neurons) with the lowest
    HEAPr score, editing ``model`` in place; returns a JSON-able report.

    Default: the same number ``round(ratio * I)`` of atoms leaves every expert of every layer,
    each expert dropping its own lowest-scoring ones; the expert tensors shrink and the config's
    intermediate size follows (loads in stock transformers, real memory saving).

    ``align``: the kept size is rounded to the nearest multiple of ``align`` (when the original
    size is one), because transformers' grouped-matmul expert kernels need rows of a multiple
    of 16 bytes (8 bf16 values); ``report["ratio_effective"]`` says what was removed.

    ``global_ranking=True`` (the paper's global ranking, non-uniform across experts and layers):
    pruned atoms are only zeroed in dense storage, so the checkpoint keeps its size.

    A streamed model (``load_model(max_gpu_memory=...)``): the scores come layer by layer
    (``_layerwise.py``) and each layer is edited onloaded, its new weights kept in
    ``offload_folder`` (``merge.offload.edited``); the result equals the in-memory run's.
    """
    _check_ratio(ratio)
    view = moe_view(model)
    edit = layer_editor(model, offload_folder)
    sizes = {layer.intermediate_size for layer in view}
    if len(sizes) != 1:
        raise MoECompressError("heapr needs every MoE layer to have the same expert intermediate size")
    inter = sizes.pop()
    shared_scores = {}
    if scores is None:
        both = _all_scores(model, tokens, batch_size, view, progress, shared=not global_ranking)
        scores = {i: routed for i, (routed, _) in both.items()}
        shared_scores = {i: sh for i, (_, sh) in both.items() if sh is not None}
    atoms_total = sum(s.numel() for s in scores.values())
    report = {"method": "heapr", "ratio": ratio, "intermediate_size_before": inter,
              "paper": "HEAPr (Li et al. 2025, arXiv:2509.22299)"}
    if global_ranking:
        report.update(_prune_global(view, scores, ratio, atoms_total, edit))
        return report
    n_keep = kept_size(inter, ratio, align)
    n_remove = inter - n_keep
    if n_remove:
        for layer in view:
            order = torch.sort(scores[layer.layer_idx], dim=1, descending=True, stable=True).indices
            with edit(layer):
                layer.keep_neurons(order[:, :n_keep].sort(dim=1).values)
        view.set_intermediate_size(n_keep)
        report["shared_experts_shrunk"] = conform_shared_experts(model, view, shared_scores, edit)
    report.update({"mode": "uniform (same atoms per expert; tensors shrink)", "storage": "shrunk",
                   "intermediate_size_after": n_keep, "ratio_effective": n_remove / inter, "align": align,
                   "atoms_removed": n_remove * atoms_total // inter,
                   "atoms_total": atoms_total})
    return report


def conform_shared_experts(model, view: MoEModel, shared_scores: dict[int, torch.Tensor], edit=None) -> dict:
    """Make every tensor the shape stock transformers builds from the edited config.

    Some families size their shared expert from the routed experts' field (DeepSeek-V2/V3,
    GLM-4.5, ERNIE: ``n_shared * moe_intermediate_size``; Llama-4: ``intermediate_size``), so a
    smaller routed size shrinks the shared expert too: it keeps its highest-scoring atoms (the
    same HEAPr criterion, every token, weight 1 or its sigmoid gate). Any other mismatch is
    refused before anything is written. ``edit(layer)`` wraps each layer's edit (streamed
    models, see :func:`heapr_prune`).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    shrunk = {}
    for layer, meta_layer in zip(view, moe_view(meta)):
        parts, meta_parts = shared_mlp_parts(layer), shared_mlp_parts(meta_layer)
        if parts is None or meta_parts is None:
            continue
        want, have = meta_parts[0].weight.shape[0], parts[0].weight.shape[0]
        if want == have:
            continue
        if layer.layer_idx not in shared_scores:
            raise MoECompressError("the shared expert must shrink with the routed experts in this family; "
                                   "let heapr_prune compute the scores itself (no scores= argument)")
        keep = torch.sort(shared_scores[layer.layer_idx], descending=True, stable=True).indices[:want].sort().values
        with edit(layer) if edit is not None else contextlib.nullcontext():
            _keep_linear_rows(parts[0], keep)
            _keep_linear_rows(parts[1], keep)
            dn = parts[2]
            dn.weight = nn.Parameter(dn.weight.data.index_select(1, keep.to(dn.weight.device)).contiguous())
            dn.in_features = want
        shrunk[layer.layer_idx] = {"before": have, "after": want}
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = sorted(k for k in expected if k in actual and expected[k] != actual[k])
    if wrong:
        raise MoECompressError(f"after resizing, '{wrong[0]}' no longer matches what the config describes "
                               f"({actual[wrong[0]]} vs {expected[wrong[0]]}); use --heapr-global (masked zeros) instead")
    return shrunk


def _keep_linear_rows(lin: nn.Linear, keep: torch.Tensor) -> None:
    idx = keep.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(0, idx).contiguous())
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).contiguous())
    lin.out_features = idx.numel()


def kept_size(inter: int, ratio: float, align: int = 8) -> int:
    """Atoms each expert keeps: ``inter - round(ratio * inter)``, rounded to the nearest multiple
    of ``align`` (a tie, or a rounding that would remove nothing, goes down)."""
    n_keep = inter - int(round(ratio * inter))
    if align > 1 and inter % align == 0 and n_keep < inter:
        low = (n_keep // align) * align
        n_keep = low if n_keep - low <= low + align - n_keep or low + align >= inter else low + align
        n_keep = max(align, n_keep)
    if n_keep < 1:
        raise MoECompressError(f"--ratio {ratio} would remove all {inter} neurons of every expert; use a smaller ratio")
    return n_keep


def _prune_global(view: MoEModel, scores: dict[int, torch.Tensor], ratio: float, atoms_total: int, edit) -> dict:
    flat = torch.cat([scores[layer.layer_idx].reshape(-1) for layer in view])
    n_remove = int(round(ratio * atoms_total))
    removed = torch.zeros_like(flat, dtype=torch.bool)
    removed[torch.sort(flat, stable=True).indices[:n_remove]] = True
    per_layer, offset = {}, 0
    for layer in view:
        E, inter = scores[layer.layer_idx].shape
        mask = removed[offset:offset + E * inter].reshape(E, inter)
        offset += E * inter
        with edit(layer):
            zero_atoms(layer, mask)
        per_layer[layer.layer_idx] = {"atoms_removed": int(mask.sum()), "min_kept_per_expert": int((~mask).sum(1).min())}
    return {"mode": "global ranking, MASKED ZEROS (dense storage, no size saving)", "storage": "dense-with-zeros",
            "atoms_removed": n_remove, "atoms_total": atoms_total, "per_layer": per_layer}


@torch.no_grad()
def zero_atoms(layer, mask: torch.Tensor) -> None:
    """Zero atomic experts ``mask`` [E, I] (True = remove): gate/up rows, down column and the
    gate/up biases where the family has them. The atoms then contribute nothing."""
    m = mask.to(layer.gate_proj.device)
    layer.gate_proj.masked_fill_(m[:, :, None], 0)
    layer.up_proj.masked_fill_(m[:, :, None], 0)
    layer.down_proj.masked_fill_(m[:, None, :], 0)
    gb, ub, _ = layer.expert_biases
    if gb is not None:
        gb.masked_fill_(m, 0)
        ub.masked_fill_(m, 0)
