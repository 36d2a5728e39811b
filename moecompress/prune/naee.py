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
  Gram matrices of one layer stay within 512 MiB). Every expert runs once per cached token, all
  experts in one batched product (``MoELayer.experts_forward``), and never again. With
  d_t = w_t - w'_t (routing weights of the full layer and of the layer restricted to S, dense
  over E), the squared error is sum_t d_t^T G_t d_t: exact for every family whose routing
  weight scales the expert output. (Llama-4 scales the expert *input*; there the error uses the
  linearised contribution w * f(x).) Shared experts are identical in both outputs and cancel.
* w'_t comes from the layer's own router restricted to S (:mod:`.subrouter`), so the
  re-routing after pruning (top-k among the kept, renormalisation, groups) is exact. The
  router runs once for all the sets of a search round (``SubsetRouters``: its own code on the
  full router's logits restricted to each set), and the errors of the round come from one
  batched contraction with G (:class:`SubsetErrors`), in blocks of tokens.
* Search: exhaustive over all C(E - |protected|, r - |protected|) sets when that is at most
  ``naee_max_combinations``, else backward elimination (drop, one at a time, the expert whose
  removal increases the error least) keeping the ``naee_beam`` best sets at every step. Ties
  go to the lexicographically first set.
* Incremental rounds (``SubsetErrors.removals``): a round of the beam scores the sets S - {j}
  for every j of a kept set S. For a token that did not select j, S - {j} routes as S does
  wherever removing an unselected expert leaves the selection alone (top-k of per-expert
  scores), and its weights either stay (softmax over the top-k, renormalised top-k, sigmoid:
  ``removal_effect`` "none") or, a softmax over all experts without renormalisation, grow by
  1 / (1 - p_j) (``"softmax"``; the error is then e_t + 2 delta^T G_t d_t + delta^T G_t delta
  on the k selected experts). So the router runs once over the T tokens for S and once over the
  T k rows of S minus one selected expert, instead of over the T m rows of every candidate. A
  token whose lowest selected score ties with an unselected one (bf16 logits tie often; the
  score is the logit, or sigmoid(z) + b with a correction bias) is routed for every candidate,
  since the router's choice among tied experts may move with the row's layout. The rule is
  declared per family (``FamilySpec.removal_effect``; none for a bias added after a softmax,
  sparsemixer, Llama-4's input scaling; and rounds whose sets may route in groups) and checked
  before use: the widest round (the scores; where the full set routes in
  groups, the first round whose sets route plainly) is computed both ways and must agree to
  1e-4, else the layer scores every candidate set with the router (``incremental`` in the
  record). Equal to the router's own code up to the rounding of a weight to the router's dtype.
* Layer-wise sequential, as in the paper: layer l's tokens are collected while layers < l
  already route among their kept experts (router hooks; weights untouched). The calibration
  activations are carried from layer to layer (``capture.LayerCursor``): each layer runs once
  to be observed and once more, pruned, for the next (not a pass from the embeddings per layer).
  Once a layer's set is final, ``Selection.on_layer`` hands it to the caller (a streamed prune
  re-fits the layer then, its MoE block still on the GPU: ``prune.checkpoint.refit_schedule``).

Cost per layer (E experts, K kept, beam B, T cached tokens, hidden H, expert width I):
* Gram cache: T x E expert forwards (6 T E H I flops) and 2 T E^2 H flops; T E^2 floats kept.
* Beam search: E - K rounds; the round from m kept sets evaluates at most B m sets of m - 1,
  about B (E^2 - K^2) / 2 sets in all (1,552 at E = 64, K = 32, B = 1; 24,640 at E = 256,
  K = 128). A round costs one router pass over B m T rows of width m - 1 (memory-bound: about
  B T m^2 elements per pass, B T (E^3 - K^3) / 3 over the search) and 2 B m T E^2 flops for
  the errors: O(B T E^4) flops, O(B T E^3) memory traffic, E - K + 1 host synchronisations.
  No expert runs during the search. (The per-set search it replaced ran the router on the
  T hidden states per set, T m H flops each, and one small kernel sequence per set.)
  With the incremental rule a round from m kept sets costs B router passes over T (k + 1)
  rows of width m (instead of B m T rows) and about 2 B (k + 1) T E^2 flops (instead of
  2 B m T E^2): O(B T k E (E - K)) memory traffic and O(B T k E^2 (E - K)) flops over the
  search, the widest round (the scores) still O(T E^3) by the router.
* Exhaustive: C(E', K') sets of K experts, each T K^2 + 2 T E^2 flops, in blocks of tokens.
Measured: docs/benchmarks.md ("Scale and streaming"), bench/naee_complexity.py on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..arch import MoELayer
from ..capture import LayerCursor, batches_of, execution_device
from ..errors import MoECompressError
from ..onload import is_streamed
from .selection import Plan, Selection
from .subrouter import SubsetRouters, SubsetRouting, route_subset, sub_router

DEFAULTS = {"naee_tokens": 32768, "naee_max_combinations": 2000, "naee_beam": 1}
_GRAM_BUDGET = 1 << 29  # bytes of cached Gram matrices per layer (caps the token subsample)
# Elements of the largest working tensors: expert outputs computed at once (tokens x E x H),
# routing weights of the candidate sets scored at once (sets x tokens x E); about 8 such
# tensors (float32) are alive at the peak. A streamed model's cap leaves room for this (and
# the Gram matrices) only. In GPU memory larger blocks run faster: each block of tokens
# reads every expert's weights once.
_WORK_ELEMENTS = 1 << 24


def cached_tokens(num_experts: int, naee_tokens: int) -> int:
    """Tokens a layer's cache holds: ``naee_tokens``, capped so that their Gram matrices
    (E x E float32 each) stay within ``_GRAM_BUDGET``."""
    return min(int(naee_tokens), max(1, _GRAM_BUDGET // (4 * num_experts * num_experts)))


def working_bytes(num_experts: int, hidden: int, options: dict | None = None) -> int:
    """GPU bytes NAEE holds for a streamed layer besides the layer and the batch's activations:
    the cached tokens (inputs, routing weights, logits) with their Gram matrices, and the
    working tensors (``_WORK_ELEMENTS``, about 8 alive at once)."""
    opts = {**DEFAULTS, **(options or {})}
    E = num_experts
    tokens = cached_tokens(E, opts["naee_tokens"])
    return tokens * 4 * (E * E + hidden + 2 * E) + 8 * 4 * _WORK_ELEMENTS


def _work_elements(model) -> int:
    """The working-tensor size for ``model``: the streamed / CPU size, or on a GPU holding the
    model, up to 1/256 of the GPU's memory (a property of the device, not of its free memory
    at the time, so that the same inputs give the same bytes)."""
    dev = execution_device(model)
    if is_streamed(model) or dev.type != "cuda":
        return _WORK_ELEMENTS
    return max(_WORK_ELEMENTS, min(1 << 28, torch.cuda.get_device_properties(dev).total_memory // 256))


class LayerCache:
    """Subsampled tokens of one layer: inputs x [N, H], full-layer routing weights w [N, E], the
    full router's logits [N, E] and Gram matrices of all experts' outputs G [N, E, E] (float32)."""

    def __init__(self, layer: MoELayer, per_batch: int, seed: int, work_elements: int = _WORK_ELEMENTS):
        self.layer = layer
        self.work_elements = work_elements
        self.per_batch = per_batch
        self.gen = torch.Generator().manual_seed(seed)
        self.x: list[torch.Tensor] = []
        self.w: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.gram: list[torch.Tensor] = []

    def observe(self, layer: MoELayer, x: torch.Tensor, routing, y: torch.Tensor) -> None:
        if layer.layer_idx != self.layer.layer_idx:
            return
        pick = torch.randperm(x.shape[0], generator=self.gen)[: self.per_batch].sort().values.to(x.device)
        xs = x.index_select(0, pick)
        self.x.append(xs)
        self.w.append(routing.dense_weights(layer.num_experts).index_select(0, pick))
        self.logits.append(routing.logits.index_select(0, pick.to(routing.logits.device)))
        self.gram.append(expert_gram(layer, xs, self.work_elements))

    def errors(self) -> "SubsetErrors":
        return SubsetErrors(self.layer, torch.cat(self.x), torch.cat(self.w), torch.cat(self.logits),
                            torch.cat(self.gram), self.work_elements)


@torch.no_grad()
def expert_gram(layer: MoELayer, x: torch.Tensor, work_elements: int = _WORK_ELEMENTS) -> torch.Tensor:
    """G [T, E, E]: inner products of every pair of experts' outputs on each token of x, every
    expert computed once per token in one batched product (``MoELayer.experts_forward``)."""
    E, H = layer.num_experts, x.shape[1]
    step = max(1, work_elements // (E * H))
    out = []
    for i in range(0, x.shape[0], step):
        f = layer.experts_forward(x[i : i + step])[1].float().transpose(0, 1)  # [t, E, H]
        out.append(f @ f.transpose(1, 2))
    return torch.cat(out)


class SubsetErrors:
    """sum_t || F(x_t) - F_S(x_t) ||^2 (routed part) for many kept sets S at once, from one
    layer's cache: no expert runs again. Per chunk of candidate sets, the pruned layer's routing
    weights w'_S come from one router call (``subrouter.SubsetRouters``) and the error is
    sum_t d_t^T G_t d_t with d = w - w'_S, one batched product [T, c, E] x [T, E, E]."""

    def __init__(self, layer: MoELayer, x: torch.Tensor, w: torch.Tensor, logits: torch.Tensor, gram: torch.Tensor,
                 work_elements: int = _WORK_ELEMENTS):
        self.layer, self.x, self.w, self.logits, self.gram = layer, x, w, logits, gram
        self.routers = SubsetRouters(layer)
        self.work_elements = work_elements
        self.evaluated = 0
        self.tied_tokens = self.round_tokens = 0  # incremental rounds: tokens routed in full for a tie, of all

    def total(self) -> float:
        """||F(X)||^2 (routed part): the error of keeping no expert."""
        w = self.w
        return float((w.unsqueeze(1) @ self.gram).squeeze(1).mul(w).sum(dtype=torch.float64))

    @torch.no_grad()
    def __call__(self, sets: torch.Tensor) -> torch.Tensor:
        """Errors (float64, CPU) of the kept sets ``sets`` [C, m] (ascending rows, one size).

        All sets go together through blocks of tokens (a router works row by row, and the
        error is a sum over tokens): per token, d [C, E] x G_t [E, E] is a product of useful
        size even for a small block, which a streamed model's working-memory budget needs."""
        C = sets.shape[0]
        T, E = self.w.shape
        self.evaluated += C
        step = max(1, self.work_elements // (C * E))
        err = torch.zeros(C, dtype=torch.float64, device=self.w.device)
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            routed = self.routers.route(self.logits[t0:t1], sets)
            # d [t, C, E] = w - w'_S: the full layer's weights minus the pruned layer's (top-k
            # entries of a row are distinct, so the scatter-add is exact and deterministic)
            d = self.w[t0:t1, None, :].expand(t1 - t0, C, E).contiguous()
            if routed is None:  # routing candidate by candidate (the pruned layer's router on x)
                d -= torch.stack([self._routed_one(s, self.x[t0:t1]) for s in sets], dim=1)
            else:
                idx, weight = routed
                d.scatter_add_(2, idx, weight.neg_())
            err += torch.bmm(d, self.gram[t0:t1]).mul_(d).sum(dim=(0, 2), dtype=torch.float64)
        return err.cpu()

    @torch.no_grad()
    def removals(self, parent: torch.Tensor, form: str) -> torch.Tensor | None:
        """Errors (float64, CPU) [m] of the sets ``parent`` [m] (ascending) without each of its
        experts, by the incremental rule (module docstring, "Incremental rounds"): the layer's
        router runs on the T tokens for ``parent`` and, per token, only for the k sets without
        one of the experts it selected. ``form`` says how a token's weights change when an
        expert it did not select goes (``MoELayer.removal_effect``): ``none``, or ``softmax`` (they
        grow by 1 / (1 - p_j)).
        None where the rule does not apply (sets that may route in groups, or sets of one expert)."""
        m = parent.numel()
        T, E = self.w.shape
        if m - 1 < 2 or self.routers._groups(m) > 1 or self.routers._groups(m - 1) > 1:
            return None
        parent = parent.to(self.w.device)
        pos_of = torch.full((E,), -1, dtype=torch.long, device=self.w.device)
        pos_of[parent] = torch.arange(m, device=self.w.device)
        step = max(1, self.work_elements // (max(1, self.layer.top_k) * E))  # d [t, k, E] per block
        out = torch.zeros(m, dtype=torch.float64, device=self.w.device)
        # tied tokens; blocks with too many (or None: their count read, where the device lacks nonzero_static)
        ties = torch.zeros(2, dtype=torch.float64, device=self.w.device) if _static_nonzero(self.w.device) else None
        counted = self.round_tokens
        for t0 in range(0, T, step):
            out += self._removals_block(parent, form, pos_of, t0, min(T, t0 + step), ties)
        if ties is None:
            return out.cpu()
        got = torch.cat([out, ties]).cpu()  # the round's one wait for the device
        if got[m + 1] == 0:
            self.tied_tokens += int(got[m])
            return got[:m]
        out.zero_()  # a block had more tied tokens than its room: the round again, the tied tokens counted
        self.round_tokens = counted
        for t0 in range(0, T, step):
            out += self._removals_block(parent, form, pos_of, t0, min(T, t0 + step))
        return out.cpu()

    def _removals_block(self, parent: torch.Tensor, form: str, pos_of: torch.Tensor, t0: int, t1: int,
                        ties: torch.Tensor | None = None) -> torch.Tensor:
        """The errors [m] of ``parent`` without each of its experts on tokens t0..t1. With ``ties``
        (on the device: tied tokens so far, blocks whose tied tokens exceeded their room) the
        tied tokens are routed in a room of fixed size (``_TIED_ROOM``), so that nothing waits for
        the device; without, in as many rows as they are (the count read from the device)."""
        w, gram, logits = self.w[t0:t1], self.gram[t0:t1], self.logits[t0:t1]
        t, E = w.shape
        idx, weight = (v[:, 0] for v in self.routers.route(logits, parent.unsqueeze(0)))  # [t, k] among parent
        drop = pos_of[idx]  # [t, k]: the selected experts' positions in parent
        d = w.clone().scatter_add_(1, idx, weight.neg())  # the parent's d = w - w'_S
        # a token that selected j: routed again by the router's own code, on the parent without j
        rows = torch.cat([d.unsqueeze(1), self._without(parent, drop, w, logits)], dim=1)  # [t, 1 + k, E]
        g = torch.bmm(rows, gram)  # d^T G_t for all of a token's rows in one product (G symmetric)
        g_k = g[:, 0].gather(1, idx).double() if form == "softmax" else None
        quad = g.mul_(rows).sum(dim=2, dtype=torch.float64)  # [t, 1 + k]: d^T G_t d
        err = quad[:, 0]  # each token's error under the parent
        if form == "none":  # a token that did not select j is routed the same without j
            per = err.unsqueeze(1).expand(t, parent.numel())
        else:  # softmax over the set: without j, the selected weights c p_i / (1 - p_j), rounded as the router does
            p = torch.softmax(logits.index_select(1, parent).float(), dim=1)  # [t, m]
            grown = (self.layer.routed_scaling * p.gather(1, drop).unsqueeze(1) / (1 - p).unsqueeze(2))
            delta = (weight.unsqueeze(1) - grown.to(self.routers.weight_dtype).float()).double()  # [t, m, k]: d' - d on K
            k = idx.shape[1]
            gram_kk = gram.gather(1, idx.unsqueeze(2).expand(t, k, E)).gather(2, idx.unsqueeze(1).expand(t, k, k))
            # delta^T G_KK delta per token and set: one batched product (an einsum of the three
            # took ~28 small kernels a round on a GPU)
            per = err.unsqueeze(1) + 2 * (delta * g_k.unsqueeze(1)).sum(dim=2) + torch.bmm(
                delta, gram_kk.double()).mul_(delta).sum(dim=2)
        # (the selected positions of a row are distinct: a scatter, then a sum over tokens, is deterministic)
        per = per.scatter(1, drop, quad[:, 1:])
        # A token whose lowest selected score (what the router ranks by) ties with, or lies below, an
        # unselected one: which of the tied experts the router takes may move with the row's layout,
        # so every set without one of its experts is routed by the router's own code.
        z = self.routers.choice_scores(logits, parent)
        chosen = torch.zeros(z.shape, dtype=torch.bool, device=z.device).scatter_(1, drop, True)
        is_tied = (z.masked_fill(~chosen, float("inf")).amin(dim=1) <= z.masked_fill(chosen, float("-inf")).amax(dim=1))
        m = parent.numel()
        self.round_tokens += t
        step = max(1, self.work_elements // (m * E))
        if ties is None:
            tied = torch.nonzero(is_tied).flatten()
            self.tied_tokens += tied.numel()
            rows_of = tied
        else:  # a fixed room; its spare places name row t, where their results are dropped
            room = max(_TIED_MIN_ROOM, math.ceil(_TIED_ROOM * t))
            count = is_tied.sum()
            ties += torch.stack([count.double(), (count > room).double()])
            rows_of = torch.nonzero_static(is_tied, size=room, fill_value=t).flatten()
            per = torch.cat([per, per.new_zeros(1, m)])
        for i in range(0, rows_of.numel(), step):
            r = rows_of[i : i + step]
            at = r.clamp(max=t - 1)  # (a spare place computes on a real row)
            rows = self._without(parent, torch.arange(m, device=r.device).expand(r.numel(), m), w[at], logits[at])
            per[r] = torch.bmm(rows, gram[at]).mul_(rows).sum(dim=2, dtype=torch.float64)
        return per[:t].sum(dim=0)

    def _without(self, parent: torch.Tensor, drop: torch.Tensor, w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[t, r, E]: each token's d = w - w' in the parent set without ``parent[drop[t, c]]``,
        routed by the router's own code (``SubsetRouters.route_without``)."""
        t, E = w.shape
        idx, weight = self.routers.route_without(logits, parent, drop)
        return w.unsqueeze(1).expand(t, drop.shape[1], E).contiguous().scatter_add_(2, idx, weight.neg())

    def _routed_one(self, keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        idx = keep.cpu()
        return route_subset(self.layer, sub_router(self.layer, idx), idx, x).dense_weights(self.layer.num_experts)


def _choose(layer: MoELayer, errors: SubsetErrors, keep: int, protected: set[int],
            opts: dict, groups: int = 1) -> tuple[list[int], torch.Tensor, dict]:
    """Layer ``layer``'s kept set, per-expert scores and a record, from its cached tokens."""
    E = layer.num_experts
    # Per-expert score: the error caused by removing that expert alone (higher = keep).
    singles = torch.tensor([[f for f in range(E) if f != e] for e in range(E)], dtype=torch.long).reshape(E, E - 1)
    scores = errors(singles)
    total = errors.total()
    rounds = _Rounds(errors, singles, scores, total)
    best, err, how = search(rounds, E, keep, protected, int(opts["naee_max_combinations"]), int(opts["naee_beam"]),
                            groups)
    record = {"relative_error": err / total if total > 0 else 0.0, "search": how, "tokens": int(errors.w.shape[0]),
              "evaluated_sets": errors.evaluated, "incremental": rounds.form,
              "tied_share": round(errors.tied_tokens / errors.round_tokens, 4) if errors.round_tokens else None}
    return best, scores, record


# Tied tokens of a block routed in full without waiting for their count: a room of this share of
# the block's tokens (3.0-6.3% were tied on the published shapes; a round whose block has more is
# computed again with the count read), at least _TIED_MIN_ROOM rows.
_TIED_ROOM = 0.125
_TIED_MIN_ROOM = 64


@functools.cache
def _static_nonzero(device: torch.device) -> bool:
    """Whether ``torch.nonzero_static`` runs on ``device`` (on CUDA only in later torch 2.x)."""
    try:
        torch.nonzero_static(torch.ones(2, dtype=torch.bool, device=device), size=1)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return True


# Agreement asked of the incremental rule with the router's own code on the widest round: float32
# rounding of each token's error is ~1e-7 of it; a rule that does not describe the router misses
# whole tokens' contributions.
_INCREMENTAL_RTOL = 1e-4


class _Rounds:
    """The search's errors for one layer: sets of E - 1 experts from the scores (computed with
    the router's own code on every set); the later rounds of the beam by the incremental rule
    (``SubsetErrors.removals``) once it has reproduced a round routed for every set: the
    scores, or, where the full set routes in groups (DeepSeek-V3), the first round whose sets
    route plainly, which is then routed for every set too."""

    def __init__(self, errors: SubsetErrors, singles: torch.Tensor, scores: torch.Tensor, total: float):
        self.errors = errors
        self.total = total  # ||F(X)||^2, the scale of the check's tolerance
        self.num_experts = singles.shape[0]
        self.known = {tuple(s): float(v) for s, v in zip(singles.tolist(), scores)}
        self.rule = errors.layer.removal_effect  # declared by the family; None: route every set
        self.form: str | None = None  # the rule, once checked
        full = torch.arange(self.num_experts)
        got = errors.removals(full, self.rule) if self.rule is not None else None
        if got is not None:
            self._check(got, scores)
        self.checked = got is not None or self.rule is None

    def _check(self, got: torch.Tensor, routed: torch.Tensor) -> None:
        tol = _INCREMENTAL_RTOL * routed.abs() + 1e-6 * max(float(routed.abs().max()), self.total, 1e-30)
        self.form = self.rule if bool(((got - routed).abs() <= tol).all()) else None

    def __call__(self, sets: torch.Tensor) -> torch.Tensor:
        if sets.shape[1] == self.num_experts - 1:  # sets of E - 1 experts are the score sets, already known
            return torch.tensor([self.known[tuple(s)] for s in sets.tolist()], dtype=torch.float64)
        return self.errors(sets)

    def removals(self, parents: torch.Tensor) -> torch.Tensor | None:
        """[b, m] errors of each parent set without each of its experts, or None (score the
        candidates one set each, with ``__call__``)."""
        if parents.shape[1] == self.num_experts or (self.checked and self.form is None):
            return None
        rows = [self.errors.removals(p, self.form or self.rule) for p in parents]
        if any(r is None for r in rows):
            return None
        if self.checked:
            return torch.stack(rows)
        # the first round the rule applies to: routed for every set as well, and the rule kept if equal
        m = parents.shape[1]
        counted = self.errors.evaluated
        routed = self.errors(removal_sets(parents).reshape(-1, m - 1)).view(-1, m)
        self.errors.evaluated = counted  # the search counts the round's distinct sets
        self._check(torch.stack(rows), routed)
        self.checked = True
        return routed

    def note_evaluated(self, n: int) -> None:
        self.errors.evaluated += n


def removal_sets(parents: torch.Tensor) -> torch.Tensor:
    """[b, m, m - 1]: each set of ``parents`` [b, m] without each of its experts, in position
    order (ascending rows stay ascending)."""
    b, m = parents.shape
    return parents[:, None, :].expand(b, m, m)[:, ~torch.eye(m, dtype=torch.bool)].reshape(b, m, m - 1)


def search(errors, num_experts: int, keep: int, protected: set[int], max_combinations: int,
           beam: int, groups: int = 1) -> tuple[list[int], float, str]:
    """The kept set minimising the error: exhaustive when small enough, else beam search by
    backward elimination. ``errors(sets)`` takes a [C, m] tensor of kept sets (ascending rows,
    all of one size) and returns their C errors; every round of the search is one call.
    An ``errors`` that also has ``removals(parents)`` ([b, m] errors of each parent set without
    each of its experts, or None) and ``note_evaluated(n)`` gets each beam round as one such call
    (``_Rounds``: NAEE's incremental rounds); the sets and their order are the same.
    Returns (kept ascending, its error, "exhaustive"|"beam"). With ``groups`` > 1 only sets
    that keep keep / groups experts of every contiguous group of experts are candidates
    (grouped routing, see ``Selection.groups``).

    Cost (E experts, K kept, beam B): exhaustive evaluates C(E - |protected|, K - |protected|)
    sets; the beam evaluates at most B x m sets of m - 1 experts in the round from m experts,
    sum over m = E..K+1 of B x m, about B (E^2 - K^2) / 2 sets in E - K rounds (1,552 at
    E = 64, K = 32, B = 1). Ties go to the lexicographically first set, as in sorted order."""
    size, quota = num_experts // groups, keep // groups
    free = [e for e in range(num_experts) if e not in protected]
    need = keep - len(protected)
    prot = torch.tensor(sorted(protected), dtype=torch.long)
    if math.comb(len(free), need) <= max_combinations:
        combos = torch.combinations(torch.tensor(free, dtype=torch.long), need) if need else torch.zeros(1, 0, dtype=torch.long)
        combos = combos.reshape(-1, need)  # lexicographic, as itertools.combinations
        sets = torch.cat([combos, prot.expand(combos.shape[0], -1)], dim=1).sort(dim=1).values
        if groups > 1:  # every group keeps its quota
            sets = sets[(_group_counts(sets, size, groups) == quota).all(dim=1)]
        errs = errors(sets).tolist()
        i = min(range(len(errs)), key=lambda j: (errs[j], j))  # the first (lexicographic) set wins ties
        return sets[i].tolist(), errs[i], "exhaustive"
    is_free = torch.ones(num_experts, dtype=torch.bool)
    is_free[prot] = False
    frontier = torch.arange(num_experts).unsqueeze(0)  # [b, m] kept sets, ascending rows
    best_err = None
    while frontier.shape[1] > keep:
        removable = is_free[frontier]  # [b, m]: position j may go (unprotected ...
        if groups > 1:  # ... and its group stays above the quota)
            removable &= _group_counts(frontier, size, groups).gather(1, frontier // size) > quota
        cands = removal_sets(frontier)  # [b, m, m-1]
        by_removal = getattr(errors, "removals", lambda _: None)(frontier)  # [b, m] or None
        # sorted lexicographically, like sorted(set(...)); a set reached from two parents once
        if frontier.shape[0] == 1:  # one parent's sets are distinct, in descending order by position
            cands = cands[removable].flip(0)
            inverse = torch.arange(cands.shape[0] - 1, -1, -1)
        else:
            cands, inverse = torch.unique(cands[removable], dim=0, return_inverse=True)
        if by_removal is None:
            errs = errors(cands)
        else:  # each set's error from its first parent
            flat = by_removal[removable]
            first = torch.full((cands.shape[0],), flat.shape[0], dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(flat.shape[0]), reduce="amin")
            errs = flat[first]
            errors.note_evaluated(cands.shape[0])
        order = torch.sort(errs, stable=True).indices  # ties: lexicographic order kept
        frontier = cands[order[:beam]]
        best_err = float(errs[order[0]])
    if best_err is None:  # nothing to remove
        best_err = float(errors(frontier)[0])
    return frontier[0].tolist(), best_err, "beam"


def _group_counts(sets: torch.Tensor, size: int, groups: int) -> torch.Tensor:
    """[C, groups]: how many experts of each contiguous group of ``size`` every set holds."""
    return torch.zeros(sets.shape[0], groups, dtype=torch.long).scatter_add_(1, sets // size, torch.ones_like(sets))


def naee_select(sel: Selection) -> Plan:
    """NAEE (Lu et al. 2024, Eq. 3): per layer, in order, the kept set with the least output
    reconstruction error on calibration tokens (see the module docstring)."""
    if sel.tokens is None:
        raise MoECompressError("naee measures reconstruction error on calibration text; pass --calib FILE")
    opts = {**DEFAULTS, **{k: v for k, v in sel.options.items() if k in DEFAULTS}}
    view, keep = sel.view, sel.keep
    E = view.layers[0].num_experts
    chunks = batches_of(sel.tokens, sel.batch_size)
    max_tokens = cached_tokens(E, opts["naee_tokens"])
    per_batch = max(1, math.ceil(max_tokens / len(chunks)))
    kept, scores, info = {}, {}, {"layers": {}}
    # Redrawn after each step rather than by a background thread competing with torch's CPU threads.
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=not sel.progress, transient=True, auto_refresh=False)
    cursor = LayerCursor(sel.model, sel.tokens, batch_size=sel.batch_size, view=view)
    work = _work_elements(sel.model)
    with SubsetRouting() as pruned_so_far, progress:
        task = progress.add_task("naee", total=len(view) * len(chunks))
        what = "naee" if sel.on_layer is None else "naee and re-fit"
        for layer in view:
            li = layer.layer_idx
            progress.update(task, description=f"{what}: layer {li}", refresh=True)
            cache = LayerCache(layer, per_batch, seed=sel.seed * 1_000_003 + li, work_elements=work)
            # Streamed, with a caller that works on the layer next (the re-fit): the decoder layer stays
            # on the GPU from this selection's passes to the caller's, which would onload it again
            # (the MoE block once more, the rest once per pass; a no-op in memory)
            with cursor.holding(li) if sel.on_layer is not None else contextlib.nullcontext():
                with cursor.editing(li, [cache], hold=True):  # layer li's tokens; on leaving, its outputs with only `best`
                    best, scores[li], info["layers"][li] = _choose(layer, cache.errors(), keep,
                                                                   sel.protected.get(li, set()), opts, sel.groups)
                    kept[li] = best
                    pruned_so_far.add(layer, best)
                del cache  # its Gram matrices: freed before the caller works on the layer
                # the cursor is past layer li for good: its routing hook has done its work, and the
                # caller's edits of the layer (on_layer) must meet the original router
                pruned_so_far.discard(li)
                if sel.on_layer is not None:
                    sel.on_layer(li, best)
            progress.advance(task, len(chunks))
            progress.refresh()
    info["options"] = opts
    return Plan(kept=kept, scores=scores, info=info)
