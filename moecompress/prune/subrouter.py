"""Routing among a subset of experts with the model's own router code.

After pruning, a layer's router picks its top-k among the kept experts only. To score a
candidate kept set without editing the model (NAEE's search, layer-wise sequential pruning),
we build a *sub-router*: a copy of the layer's router module with only the kept rows (and
per-expert router tensors), the same attribute fixes that :meth:`MoEModel.keep_experts`
applies (``num_experts``, ``top_k = min(top_k, kept)``, one routing group unless the kept
experts are the same number from every group). Running it is exactly what the pruned layer's
router computes, for every family, because it *is* that router.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import nn

from ..arch import MoELayer, Routing, balanced_groups, stays_grouped
from ..onload import detached_copy, onloaded


def _set_path(obj, dotted: str, value) -> None:
    head, _, last = dotted.rpartition(".")
    setattr(operator.attrgetter(head)(obj) if head else obj, last, value)


def _group_attrs(router: nn.Module) -> tuple[str | None, str | None]:
    n = next((a for a in ("num_group", "n_group") if hasattr(router, a)), None)
    return n, ("topk_group" if hasattr(router, "topk_group") else None)


@torch.no_grad()
def sub_router(layer: MoELayer, keep: list[int] | torch.Tensor) -> nn.Module:
    """A copy of ``layer``'s router that routes among ``keep`` only (indices in ``keep`` order)."""
    src = layer.router
    with onloaded(src):  # a streamed model's router: copy its weights, not its offload hooks
        r = detached_copy(src)  # a router is small ([E, H]); the experts are not copied
    idx = torch.as_tensor(keep, dtype=torch.long, device=r.weight.device)
    for mod in r.modules():  # never inherit hooks registered on the original
        for name, v in list(vars(mod).items()):
            if "hooks" in name and isinstance(v, dict):
                setattr(mod, name, type(v)())
    r.weight = nn.Parameter(r.weight.data.index_select(0, idx), requires_grad=False)
    for path in layer.spec.router_expert_tensors:
        t = operator.attrgetter(path)(r)
        new = t.data.index_select(-1, idx.to(t.device))
        _set_path(r, path, nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new)
    m = idx.numel()
    if hasattr(r, "num_experts"):
        r.num_experts = m
    if hasattr(r, "top_k"):
        r.top_k = min(int(r.top_k), m)
    if hasattr(r, "out_features"):  # nn.Linear-based routers (Llama-4, PhiMoE)
        r.out_features = m
    n_attr, k_attr = _group_attrs(r)
    if n_attr is not None:
        n_group = int(getattr(r, n_attr) or 1)
        # Same rule as MoEModel.keep_experts: grouped routing stays only if the kept experts
        # are the same number from every group, else one group (plain top-k among the kept).
        if n_group > 1 and not stays_grouped(layer.model.config, layer.spec, layer.num_experts, idx.tolist()):
            setattr(r, n_attr, 1)
            if k_attr is not None:
                setattr(r, k_attr, 1)
    return r


@contextlib.contextmanager
def _exact_float32_matmul():
    """TF32 (or bf16) matmuls of float32 operands off: the identity product below must be exact."""
    precision, tf32 = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)


class SubsetRouters:
    """The routing of one layer pruned to each of many kept sets, from the tokens' logits
    under the full router, with one call of the router's own forward per batch of sets.

    The pruned layer's router computes logits x W[S]^T = (x W^T)[:, S], then its own top-k,
    normalisation and groups among the m kept experts. So the :func:`sub_router` for m experts
    (same attribute fixes) runs with the identity as its weight on input rows
    ``logits[t, S_c]``, for every set c and token t at once: the product with the identity is
    exact (one term, the others exactly 0), and every later step of a router works row by row.
    Per-expert router tensors (correction biases) become per-row [C*T, m]; the linear's own
    bias (GPT-OSS ``bias``) is already inside the logits and becomes 0.
    """

    def __init__(self, layer: MoELayer):
        self.layer = layer
        with onloaded(layer.router):  # a streamed router's per-expert tensors, full width
            self.expert_tensors = {p: t.detach().reshape(-1).clone() for p, t in layer.router_expert_tensors.items()}
        self._templates: dict[tuple[int, bool], nn.Module] = {}
        self.weight_dtype = torch.float32  # of the routing weights the router returned last

    def _template(self, sets: torch.Tensor) -> nn.Module:
        """The router for sets like ``sets[0]`` (m experts; grouped or not, :func:`sub_router`'s
        rule), with the identity as its weight."""
        m = sets.shape[1]
        key = (m, self._grouped(sets[:1]).item())
        if key not in self._templates:
            if len(self._templates) > 4:  # a search goes down in size (m and m - 1 per round): keep the latest
                self._templates.clear()
            # which m experts an ungrouped template is cut for does not matter (its weight and per-expert
            # tensors are replaced): the first m, not the set, whose values a GPU would wait to give
            r = sub_router(self.layer, sets[0].tolist() if key[1] else list(range(m)))
            r.weight = nn.Parameter(torch.eye(m, dtype=r.weight.dtype, device=r.weight.device), requires_grad=False)
            for attr in ("hidden_dim", "in_features"):  # the router's input width is now m
                if hasattr(r, attr):
                    setattr(r, attr, m)
            self._templates[key] = r
        return self._templates[key]

    def _groups(self, m: int) -> int:
        """Routing groups a set of m experts may keep (1: it routes among its experts plainly)."""
        layer = self.layer
        return balanced_groups(layer.model.config, layer.spec, layer.num_experts, m) if _group_attrs(layer.router)[0] else 1

    def _grouped(self, sets: torch.Tensor) -> torch.Tensor:
        """[C] bool: whether each (ascending) set keeps grouped routing, as :func:`stays_grouped`
        decides for one set: the same number of experts from every group."""
        layer = self.layer
        E, m = layer.num_experts, sets.shape[1]
        n_group = self._groups(m)
        if n_group <= 1:
            return torch.zeros(sets.shape[0], dtype=torch.bool)
        counts = torch.zeros(sets.shape[0], n_group, dtype=torch.long, device=sets.device)
        counts.scatter_add_(1, sets // (E // n_group), torch.ones_like(sets))
        return (counts == counts[:, :1]).all(dim=1).cpu()

    @torch.no_grad()
    def route(self, logits: torch.Tensor, sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Top-k experts (the layer's numbering) and their weights (float32), both [T, C, k], of
        the T tokens with full-router ``logits`` [T, E] in the layer pruned to each set of
        ``sets`` [C, m] (ascending rows of expert indices). None for single-expert sets, whose
        per-row tensors a router's ``squeeze`` would fold: the caller then routes them one at a
        time with :func:`sub_router`."""
        if sets.shape[1] < 2:
            return None
        grouped = self._grouped(sets)
        if grouped.any() and not grouped.all():  # two kinds of router: route each kind, then merge
            parts = [torch.nonzero(grouped).flatten(), torch.nonzero(~grouped).flatten()]
            routed = [self._route(logits, sets[p]) for p in parts]
            idx = torch.empty(logits.shape[0], sets.shape[0], routed[0][0].shape[2], dtype=routed[0][0].dtype,
                              device=routed[0][0].device)
            weight = torch.empty(idx.shape, dtype=torch.float32, device=idx.device)
            for p, (i, w) in zip(parts, routed):
                idx[:, p.to(idx.device)], weight[:, p.to(idx.device)] = i, w
            return idx, weight
        return self._route(logits, sets)

    def _route(self, logits: torch.Tensor, sets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        C, m = sets.shape
        T = logits.shape[0]
        r = self._template(sets)
        dtype, dev = r.weight.dtype, r.weight.device
        sets = sets.to(dev)
        # row t * C + c holds set c's values
        self._per_row_tensors(r, lambda t: t[sets].expand(T, C, m).reshape(T * C, m))
        # row t * C + c: logits[t, S_c] (index_select: the same copy as logits[:, sets], one kernel)
        rows = logits.to(dev).index_select(1, sets.reshape(-1)).to(dtype).view(T * C, m)
        with _exact_float32_matmul():
            idx, weight = self.layer.topk_from_router_output(r(rows), as_float32=False)
        self.weight_dtype = weight.dtype  # what the router rounds its weights to
        weight = weight.float()
        k = idx.shape[1]
        offset = torch.arange(0, C * m, m, device=dev).view(1, C, 1)
        glob = sets.reshape(-1).take(idx.view(T, C, k) + offset)  # local expert index -> the layer's numbering
        return glob, weight.view(T, C, k)

    def _per_row_tensors(self, r: nn.Module, rows_of) -> None:
        """The template's per-expert router tensors as per-row [R, m] tensors, ``rows_of`` mapping
        a full-width tensor [E] to the rows' values; the linear's own bias (inside the logits) 0."""
        dev = r.weight.device
        for path in self.layer.spec.router_expert_tensors:
            old = operator.attrgetter(path)(r)
            new = torch.zeros_like(old) if path == "bias" else rows_of(self.expert_tensors[path].to(dev)).to(old.dtype)
            _set_path(r, path, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)

    def choice_scores(self, logits: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        """[T, m]: what the router ranks ``parent``'s experts by for a token's top-k: the
        logits, or for per-expert sigmoid scores with a correction bias (DeepSeek-V3, GLM-4.5,
        Kimi-K2) sigmoid(z) + b in float32, as those routers compute it. (A bias added to a
        softmax over the set, ERNIE's, changes with the set: no incremental rule for it.)"""
        z = logits.index_select(1, parent.to(logits.device))
        corrections = [t for path, t in self.expert_tensors.items() if path != "bias"]  # "bias": inside the logits
        if not corrections or self.layer.spec.scoring != "sigmoid":
            return z
        return torch.sigmoid(z.float()) + corrections[0].to(z.device)[parent.to(z.device)].float()

    @torch.no_grad()
    def route_without(self, logits: torch.Tensor, parent: torch.Tensor,
                      drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token t and column c of ``drop`` [T, r] (positions in ``parent``): the routing of
        token t in the layer pruned to ``parent`` [m] (ascending) without ``parent[drop[t, c]]``.
        Top-k experts (the layer's numbering) and weights (float32), both [T, r, k]. One router
        call over T * r rows of m - 1 experts, as :meth:`route` for one set per row. Not for
        sets of one expert (which :meth:`route` refuses) nor sets that may route in groups (their
        kind may differ from row to row): ``SubsetErrors.removals`` never asks for them."""
        m = parent.numel()
        T, r = drop.shape
        if m - 1 < 2 or self._groups(m - 1) > 1:
            raise ValueError(f"route_without: sets of {m - 1} experts route alone or in groups; route them one by one")
        tpl = self._template(parent[1:].unsqueeze(0))  # the router for m - 1 experts, not grouped
        dtype, dev = tpl.weight.dtype, tpl.weight.device
        parent, drop = parent.to(dev), drop.to(dev)
        # row (t, c): positions 0..m-1 of parent but drop[t, c] (a gather: no boolean mask to compact)
        ar = torch.arange(m - 1, device=dev)
        kept = (ar + (ar >= drop.unsqueeze(2)).long())  # [T, r, m - 1]

        def rows_of(values: torch.Tensor) -> torch.Tensor:  # [T, m] per token -> [T * r, m - 1]
            return values.unsqueeze(1).expand(T, r, m).gather(2, kept).view(T * r, m - 1)

        self._per_row_tensors(tpl, lambda t: rows_of(t[parent].expand(T, m)))
        rows = rows_of(logits.to(dev).index_select(1, parent).to(dtype))
        with _exact_float32_matmul():
            idx, weight = self.layer.topk_from_router_output(tpl(rows))
        k = idx.shape[1]
        local = idx.view(T, r, k)
        pos = local + (local >= drop.unsqueeze(2)).long()  # position in the row's set -> position in parent
        return parent[pos], weight.view(T, r, k)


def route_subset(layer: MoELayer, router: nn.Module, keep: torch.Tensor, x: torch.Tensor) -> Routing:
    """Routing of tokens ``x`` [T, H] by a :func:`sub_router`, with ``topk_idx`` mapped back to
    the layer's original expert numbering (``logits``/``probs`` stay over the kept experts)."""
    r = layer.routing_from_router_output(router(x))
    return Routing(logits=r.logits, probs=r.probs, topk_idx=keep.to(r.topk_idx.device)[r.topk_idx],
                   topk_weight=r.topk_weight)


def full_router_output(layer: MoELayer, router: nn.Module, keep: torch.Tensor, x: torch.Tensor):
    """What the *unpruned* layer's router would return if the removed experts did not exist:
    the sub-router's output re-expressed over all E experts (indices mapped back, removed
    experts' logits -inf, their dense scores 0). A router forward hook returning this makes the
    unpruned layer compute exactly what the pruned layer computes."""
    out = router(x.reshape(-1, x.shape[-1]))
    E = layer.num_experts
    keep = keep.to(x.device)
    if layer.spec.router_output == "scores_logits":  # Llama-4: (dense scores [T, m], logits [T, m])
        scores, logits = out
        full_scores = scores.new_zeros(scores.shape[0], E).index_copy_(1, keep, scores)
        full_logits = logits.new_full((logits.shape[0], E), float("-inf")).index_copy_(1, keep, logits)
        return full_scores, full_logits
    # (logits, weights, indices), or reversed (GraniteMoE in transformers 5.17): keep the order.
    reverse = not out[0].is_floating_point()
    logits, weight, idx = out[::-1] if reverse else out
    full_logits = logits.new_full((logits.shape[0], E), float("-inf")).index_copy_(1, keep, logits)
    res = (full_logits, weight, keep[idx])
    return res[::-1] if reverse else res


class SubsetRouting:
    """Context manager: while active, the given layers route only among their kept experts
    (router forward hooks; the model's weights are untouched)."""

    def __init__(self, layers: dict[int, tuple[MoELayer, list[int]]] | None = None):
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        for layer, keep in (layers or {}).values():
            self.add(layer, keep)

    def add(self, layer: MoELayer, keep: list[int]) -> None:
        router = sub_router(layer, keep)
        idx = torch.as_tensor(keep, dtype=torch.long)

        def hook(mod, args, out):
            return full_router_output(layer, router, idx, args[0])

        self._hooks[layer.layer_idx] = layer.router.register_forward_hook(hook)

    def discard(self, layer_idx: int) -> None:
        """Layer ``layer_idx`` routes among all its experts again."""
        hook = self._hooks.pop(layer_idx, None)
        if hook is not None:
            hook.remove()

    def remove(self) -> None:
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> "SubsetRouting":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
