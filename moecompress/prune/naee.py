"""NAEE expert pruning: keep the set of experts that best reconstructs each MoE layer's output.

Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models" (ACL 2024), Sec. 3.1: for MoE layer l with experts
E_l and a budget of r kept experts, choose

    S* = argmin_{S subset of E_l, |S| = r}  || F_l(X) - F_l(X; S) ||_F        (their Eq. 3)

on calibration tokens X, where F_l(.; S) is the layer with only the experts of S (its router
picks the top-k among S). The paper enumerates every combination; layers are pruned one after
the other, each seeing the hidden states produced by the already-pruned layers before it.

How it is computed here:
* Expert outputs are cached per token as a Gram matrix G_t[i, j] = <f_i(x_t), f_j(x_t)> over
  all E experts (E x E floats per token instead of E x H), on a seeded subsample of the
  calibration tokens (``naee_tokens``, default 32768 = all of 64 x 512; capped so that the
  Gram matrices of one layer stay within 512 MiB). With d_t = w_t - w'_t (routing weights of the full
  layer and of the layer restricted to S, dense over E), the squared error is
  sum_t d_t^T G_t d_t: exact for every family whose routing weight scales the expert output.
  (Llama-4 scales the expert *input*; there the error uses the linearised contribution
  w * f(x).) Shared experts are identical in both outputs and cancel.
* w'_t comes from the layer's own router restricted to S (:mod:`.subrouter`), so the
  re-routing after pruning (top-k among the kept, renormalisation, groups) is exact.
* Search: exhaustive over all C(E - |protected|, r - |protected|) sets when that is at most
  ``naee_max_combinations``, else backward elimination (drop, one at a time, the expert whose
  removal increases the error least) keeping the ``naee_beam`` best sets at every step.
* Layer-wise sequential, as in the paper: layer l's tokens are collected while layers < l
  already route among their kept experts (router hooks; weights untouched). The calibration
  activations are carried from layer to layer (``capture.LayerCursor``): each layer runs once
  to be observed and once more, pruned, for the next (not a pass from the embeddings per layer).
"""

from __future__ import annotations

import itertools
import math

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..arch import MoELayer
from ..capture import LayerCursor, batches_of
from ..errors import MoECompressError
from .selection import Plan, Selection
from .subrouter import SubsetRouting, route_subset, sub_router

DEFAULTS = {"naee_tokens": 32768, "naee_max_combinations": 2000, "naee_beam": 1}
_GRAM_BUDGET = 1 << 29  # bytes of cached Gram matrices per layer (caps the token subsample)
_CHUNK_ELEMENTS = 1 << 24  # expert outputs computed at once (tokens x E x H floats)


class LayerCache:
    """Subsampled tokens of one layer: inputs x [N, H], full-layer routing weights w [N, E]
    and Gram matrices of all experts' outputs G [N, E, E] (float32)."""

    def __init__(self, layer: MoELayer, per_batch: int, seed: int):
        self.layer = layer
        self.per_batch = per_batch
        self.gen = torch.Generator().manual_seed(seed)
        self.x: list[torch.Tensor] = []
        self.w: list[torch.Tensor] = []
        self.gram: list[torch.Tensor] = []

    def observe(self, layer: MoELayer, x: torch.Tensor, routing, y: torch.Tensor) -> None:
        if layer.layer_idx != self.layer.layer_idx:
            return
        pick = torch.randperm(x.shape[0], generator=self.gen)[: self.per_batch].sort().values.to(x.device)
        xs = x.index_select(0, pick)
        self.x.append(xs)
        self.w.append(routing.dense_weights(layer.num_experts).index_select(0, pick))
        self.gram.append(expert_gram(layer, xs))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.x), torch.cat(self.w), torch.cat(self.gram)


@torch.no_grad()
def expert_gram(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """G [T, E, E]: inner products of every pair of experts' outputs on each token of x."""
    E, H = layer.num_experts, x.shape[1]
    step = max(1, _CHUNK_ELEMENTS // (E * H))
    out = []
    for i in range(0, x.shape[0], step):
        xc = x[i : i + step]
        f = torch.stack([layer.expert_forward(e, xc).float() for e in range(E)], dim=1)  # [t, E, H]
        out.append(f @ f.transpose(1, 2))
    return torch.cat(out)


@torch.no_grad()
def reconstruction_error(layer: MoELayer, x: torch.Tensor, w: torch.Tensor, gram: torch.Tensor,
                         keep: list[int]) -> float:
    """sum_t || F(x_t) - F_S(x_t) ||^2 for the kept set S = ``keep`` (routed part only)."""
    idx = torch.as_tensor(keep, dtype=torch.long)
    routing = route_subset(layer, sub_router(layer, idx), idx, x)
    d = w - routing.dense_weights(layer.num_experts)
    return float(((d.unsqueeze(1) @ gram).squeeze(1) * d).sum(dtype=torch.float64))


def _choose(layer: MoELayer, x: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, keep: int, protected: set[int],
            opts: dict, groups: int = 1) -> tuple[list[int], torch.Tensor, dict]:
    """Layer ``layer``'s kept set, per-expert scores and a record, from its cached tokens."""
    memo: dict[tuple, float] = {}

    def error(s) -> float:
        key = tuple(s)
        if key not in memo:
            memo[key] = reconstruction_error(layer, x, w, gram, list(s))
        return memo[key]

    E = layer.num_experts
    best, err, how = search(error, E, keep, protected, int(opts["naee_max_combinations"]), int(opts["naee_beam"]),
                            groups)
    # Per-expert score: the error caused by removing that expert alone (higher = keep).
    scores = torch.tensor([error([f for f in range(E) if f != e]) for e in range(E)], dtype=torch.float64)
    total = float((w.unsqueeze(1) @ gram).squeeze(1).mul(w).sum(dtype=torch.float64))
    record = {"relative_error": err / total if total > 0 else 0.0, "search": how, "tokens": int(x.shape[0]),
              "evaluated_sets": len(memo)}
    return best, scores, record


def search(error, num_experts: int, keep: int, protected: set[int], max_combinations: int,
           beam: int, groups: int = 1) -> tuple[list[int], float, str]:
    """The kept set minimising ``error(list)``: exhaustive when small enough, else beam search
    by backward elimination. Returns (kept ascending, its error, "exhaustive"|"beam").
    With ``groups`` > 1 only sets that keep keep / groups experts of every contiguous group
    of experts are candidates (grouped routing, see ``Selection.groups``)."""
    size, quota = num_experts // groups, keep // groups

    def removable(s, e) -> bool:  # e may leave s without its group falling under the quota
        return e not in protected and (groups == 1 or sum(1 for f in s if f // size == e // size) > quota)

    free = [e for e in range(num_experts) if e not in protected]
    need = keep - len(protected)
    if math.comb(len(free), need) <= max_combinations:
        best = None
        for combo in itertools.combinations(free, need):
            s = sorted(set(combo) | protected)
            if groups > 1 and any(sum(1 for f in s if f // size == g) != quota for g in range(groups)):
                continue
            err = error(s)
            if best is None or err < best[1]:  # strict: the first (lexicographic) set wins ties
                best = (s, err)
        return best[0], best[1], "exhaustive"
    frontier = [tuple(range(num_experts))]
    while len(frontier[0]) > keep:
        candidates = sorted({tuple(e2 for e2 in s if e2 != e) for s in frontier for e in s if removable(s, e)})
        scored = sorted(((error(list(c)), c) for c in candidates), key=lambda t: (t[0], t[1]))
        frontier = [c for _, c in scored[:beam]]
        best_err = scored[0][0]
    return list(frontier[0]), best_err, "beam"


def naee_select(sel: Selection) -> Plan:
    """NAEE (Lu et al. 2024, Eq. 3): per layer, in order, the kept set with the least output
    reconstruction error on calibration tokens (see the module docstring)."""
    if sel.tokens is None:
        raise MoECompressError("naee measures reconstruction error on calibration text; pass --calib FILE")
    opts = {**DEFAULTS, **{k: v for k, v in sel.options.items() if k in DEFAULTS}}
    view, keep = sel.view, sel.keep
    E = view.layers[0].num_experts
    chunks = batches_of(sel.tokens, sel.batch_size)
    max_tokens = min(int(opts["naee_tokens"]), max(1, _GRAM_BUDGET // (4 * E * E)))
    per_batch = max(1, math.ceil(max_tokens / len(chunks)))
    kept, scores, info = {}, {}, {"layers": {}}
    # Redrawn after each step rather than by a background thread competing with torch's CPU threads.
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not sel.progress, transient=True, auto_refresh=False)
    cursor = LayerCursor(sel.model, sel.tokens, batch_size=sel.batch_size, view=view)
    with SubsetRouting() as pruned_so_far, progress:
        task = progress.add_task("naee", total=len(view) * len(chunks))
        for layer in view:
            li = layer.layer_idx
            progress.update(task, description=f"naee: layer {li}", refresh=True)
            cache = LayerCache(layer, per_batch, seed=sel.seed * 1_000_003 + li)
            with cursor.editing(li, [cache]):  # layer li's tokens; on leaving, its outputs with only `best`
                best, scores[li], info["layers"][li] = _choose(layer, *cache.tensors(), keep, sel.protected.get(li, set()),
                                                               opts, sel.groups)
                kept[li] = best
                pruned_so_far.add(layer, best)
            progress.advance(task, len(chunks))
            progress.refresh()
    info["options"] = opts
    return Plan(kept=kept, scores=scores, info=info)
