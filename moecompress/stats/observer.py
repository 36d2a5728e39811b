"""Accumulate per-expert routing statistics from :func:`moecompress.capture.run_calibration`.

The observer keeps each MoE layer's routing and per-pair expert values of a batch and reduces
all layers of the batch at once (stacked, no Python loop per token, no host sync, and no
floating-point atomics, so the same seed gives the same bytes on a GPU too). Sums are kept in
float64 so that results do not depend on the batch size beyond rounding.
Definitions (T = calibration tokens, k = top-k, g = routing weight the model gives a selected
expert, o = that expert's output for the token):

* ``count[e]``        number of tokens whose top-k contains e (sums to T * k).
* ``soft_count[e]``   sum over all tokens of the routing probability of e (softmax families:
                      sums to T; sigmoid families: sum of the sigmoid scores).
* ``gate_mean[e]``    mean of g over the tokens routed to e (0 for unused experts).
* ``ean[e]``          Expert Activation Norm, sum over routed tokens of ||o|| (L2), as REAP's
                      authors compute the EAN baseline (CerebrasResearch/reap, authors' code file
                      src/reap/observer.py, ``ean_sum``: the norms of the unweighted expert
                      output summed over the tokens whose top-k holds e). The EAN paper itself
                      ("Finding Fantastic Experts in MoEs", Jaiswal et al., 2025) is not in the
                      stored corpora: its own equation could not be consulted offline.
* ``reap[e]``         REAP saliency (Lasby et al., 2025, "REAP the Experts", Eq. 9):
                      S_e = 1/|X_e| * sum_{x in X_e} g_e(x) * ||f_e(x)||, X_e = tokens routed to e;
                      checked against authors' code file src/reap/observer.py (``reap``: mean over
                      routed tokens of router weight * ||expert output||, the router weight being
                      renormalised over the top-k when the model does so) and the Eq. 9 quoted by
                      openvinotoolkit/nncf (``saliency_reap``). The paper text itself is not stored.
* ``weighted_ean_sum[e]`` REAP's code criterion of that name (CerebrasResearch/reap,
                      src/reap/pruning_metrics.py ``update_pruning_state``, read at commit 1970473):
                      sum over routed tokens of g_e(x) * ||f_e(x)|| (the sum where ``reap`` is the
                      mean; g renormalised over the top-k when the model does so, as REAP's default).
* ``ean_mean[e]``     REAP's ``ean_mean``: mean over routed tokens of ||f_e(x)|| (``ean`` / ``count``).
* ``reap_l2[e]``      REAP's code lists ``reap_l2`` as a pruning criterion but never computes it
                      (no observer fills it at commit 1970473): here the L2 (root-mean-square) mean
                      of the same per-token contributions, sqrt(1/|X_e| * sum (g_e(x) ||f_e(x)||)^2).
* ``ean_ca[e]``       REAP's ``ean_ca`` (src/reap/prune.py): the norm of the expert's routed
                      characteristic activation, || 1/|X_e| * sum_{x in X_e} f_e(x) ||.
* ``max_activations[e]`` REAP's ``max_activations``: the largest (signed) value of the expert's
                      output over its routed tokens and hidden units, floored at 0 (REAP's state
                      starts at 0); ``super_out_max`` is the largest |value| at the same place.
* ``easy_ep[e]``      EASY-EP output-aware importance (Dong et al., 2025, "Domain-Specific
                      Pruning of Large MoE Models with Few-shot Demonstrations", Sec. 3):
                      c_{e,t} = g_{e,t} * ||o_{e,t}||, s_t = max(0, 1 - cos(h_t, h_t + r_t)),
                      I(E_e) = sum_t c_{e,t} * s_t, where h_t is the residual stream entering the
                      MoE block and r_t the routed-experts output (shared experts excluded).
                      Checked against the authors' code (RUCAIBox/EASYEP, pruning/model_new.py:
                      ``cos_sim_0_1 = cos(x_before_moe, x + r_moe)`` with x the residual before
                      ffn_norm; pruning/expert_selection.py: ``weight * max(1 - simibr, 0) * norm``
                      summed over tokens, norm = ||unweighted expert output||).
* ``tcess[e]``        PreMoe task-conditioned expected selection score (Pei et al., 2025,
                      "PreMoe", probabilistic expert pruning): per token, a softmax over the
                      top-k router *logits* p~_t; s_{t,e} = p~_{t,e} if e is in the top-k
                      logits and p~_{t,e} >= r, else 0; TCESS_e = 1/T * sum_t s_{t,e}
                      (r = ``tcess_threshold``, default 0, k = the model's top-k).
                      KNOWN DEVIATION from the authors' code (JarvisPei/PreMoe, collect_utils.py,
                      ``collect_moe_gate_logits_r1`` + ``build_logits_permutations``, read for
                      this audit): the threshold r is the same (local softmax over the top-k
                      logits, kept where >= r; r = -1 keeps all), and the average is over all
                      tokens, but the averaged marker there is the *raw logit* z_{t,e}, not p~
                      (and the code hard-codes k = 1, r = -1). Not switched yet: the pruning
                      tests (tests/test_prune.py, another owner) pin the probability form.
                      Only the paper's abstract (arxiv.org/html/2505.17639v1) is in the stored
                      corpora, not its equation.
* ``coactivation``    [E, E] number of tokens routing to both i and j (diagonal = count).
* ``entropy``         scalar: mean over tokens of the entropy (nats) of the routing
                      distribution over all experts (sigmoid scores normalised to sum 1).
* ``load_cv``         scalar: std / mean of ``count`` (population std).
* ``super_in_max`` / ``super_out_max``  max |activation| over routed tokens at expert e's
                      down_proj input / output (see :mod:`.super_experts`).
* ``srp`` / ``sch``   local routing consistency (see :mod:`.locality`).

Llama-4 multiplies the expert *input* by g, so there o = f_e(g * x) (what the forward
computes) and the contribution ||g-weighted output|| used by REAP and EASY-EP is ||o||.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import MoELayer, Routing
from .grouped import RoutedActivations, routed_activations
from .locality import SCHBuffer, srp_histograms

# Per routed (token, expert) pair values summed per expert: the routing weight (gate_mean), the
# expert output norm (EAN), the weighted contribution norm (REAP) and its EASY-EP weighting.
PAIR_SUMS = ("gate", "ean", "contrib", "easy", "contrib_sq")


@dataclass
class _Traffic:
    """One MoE layer's traffic of one batch, reduced to what the statistics need, kept until the
    next :meth:`StatsObserver.flush` (a few [T, E] and [T x k] tensors, never [T, H])."""

    layer_idx: int
    probs: torch.Tensor  # [T, E]
    logits: torch.Tensor  # [T, E]
    topk_idx: torch.Tensor  # [T, k]
    acts: RoutedActivations  # per routed pair, expert-sorted (its routed_output dropped)
    gram: torch.Tensor  # [T, 3] float32: h.h, h.r, r.r (h residual stream, r routed output)

    @property
    def key(self) -> tuple:
        return tuple(self.probs.shape) + (self.topk_idx.shape[1], str(self.probs.device))

    @property
    def nbytes(self) -> int:
        t = [self.probs, self.logits, self.topk_idx, self.gram, self.acts.expert, self.acts.token, self.acts.weight,
             self.acts.out_norm, self.acts.row_in_max, self.acts.row_out_max, self.acts.row_out_top,
             self.acts.out_sum]
        return sum(x.numel() * x.element_size() for x in t)


class _Sums:
    """Running sums of every layer with the same (experts, top-k), stacked [L, ...] in the order
    the layers were first seen, so that one batch of all layers is one set of kernels."""

    def __init__(self, num_experts: int, top_k: int, segment_len: int, device):
        self.E, self.k, self.m, self.device = num_experts, top_k, segment_len, device
        self.row: dict[int, int] = {}  # layer index -> row
        self.tokens: list[int] = []
        self.srp_windows: list[int] = []
        self.t: dict[str, torch.Tensor] = {}

    def _zeros(self, n: int) -> dict[str, torch.Tensor]:
        E, f64, dev = self.E, torch.float64, self.device
        return {
            "count": torch.zeros(n, E, dtype=torch.int64, device=dev),
            "soft": torch.zeros(n, E, dtype=f64, device=dev),
            "pair_sums": torch.zeros(n, E, len(PAIR_SUMS), dtype=f64, device=dev),
            "tcess": torch.zeros(n, E, dtype=f64, device=dev),
            "coact": torch.zeros(n, E, E, dtype=f64, device=dev),
            "entropy": torch.zeros(n, dtype=f64, device=dev),
            "in_max": torch.zeros(n, E, dtype=torch.float32, device=dev),
            "out_max": torch.zeros(n, E, dtype=torch.float32, device=dev),
            "out_top": torch.zeros(n, E, dtype=torch.float32, device=dev),  # REAP starts its max at 0
            "srp_hist": torch.zeros(n, self.m + 1, dtype=torch.int64, device=dev),
        }

    def rows(self, layer_ids: list[int]):
        """Row selector for ``layer_ids`` (a slice when contiguous: in-place updates on a view)."""
        new = [li for li in layer_ids if li not in self.row]
        if new:
            for li in new:
                self.row[li] = len(self.row)
                self.tokens.append(0)
                self.srp_windows.append(0)
            grow = self._zeros(len(new))
            self.t = {name: torch.cat([self.t[name], grow[name]]) if self.t else grow[name] for name in grow}
        r = [self.row[li] for li in layer_ids]
        if r == list(range(r[0], r[0] + len(r))):
            return slice(r[0], r[0] + len(r))
        return torch.tensor(r, device=self.device)


def segment_sums(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert sums [L, E, F] of expert-sorted rows values [L, F, P] (float64), offsets [L, E + 1].

    Why not ``index_add_``: floating-point atomics on a GPU add in a different order every run,
    so the same seed would not give the same bytes. A float64 prefix sum read at the expert
    boundaries is deterministic and its cancellation error (~1e-16 of the batch total) is far
    below the float32 the statistics are stored in. The scan runs along the last (contiguous)
    dimension: a scan along an outer dimension runs one sequential thread per column on a GPU.
    """
    L, F, _ = values.shape
    c = torch.nn.functional.pad(values.cumsum(-1), (1, 0))
    ends = offsets[:, None, :].expand(L, F, -1)
    bounds = c.gather(2, ends)  # [L, F, E + 1]
    return (bounds[..., 1:] - bounds[..., :-1]).transpose(1, 2)


def _gram(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """[T, 3] float32: h.h, h.r, r.r per token (one batched matmul on a GPU: fewer launches;
    on the CPU T tiny matmuls are slower than three row-wise products)."""
    if h.is_cuda:
        x = torch.stack([h, r.to(h.dtype)], dim=1).float()  # [T, 2, H]
        return torch.bmm(x, x.transpose(1, 2)).reshape(-1, 4)[:, (0, 1, 3)]
    h, r = h.float(), r.float()
    return torch.stack([(h * h).sum(-1), (h * r).sum(-1), (r * r).sum(-1)], dim=1)


class StatsObserver:
    """Observer for :func:`run_calibration`; call :meth:`finalize` after the run.

    Per layer and batch, :meth:`observe` only keeps the layer's routing and the per-pair values
    of its routed experts (plus three dot products per token for EASY-EP); :meth:`flush` (called
    by ``run_calibration`` after each batch, and whenever the kept tensors pass ``flush_bytes``)
    reduces all kept layers at once. On a GPU the statistics are then a few dozen kernel launches
    per batch instead of per layer and batch: a plain forward is itself close to bound by
    launch overhead, so per-layer statistics kernels cost as much as their launches, not their work.
    """

    def __init__(self, seq_len: int, *, segment_len: int = 16, tcess_threshold: float = 0.0,
                 sch_cache_sizes: tuple[int, ...] | None = None, max_elements: int | None = None,
                 flush_bytes: int = 256 << 20):
        self.seq_len = seq_len
        self.segment_len = min(segment_len, seq_len)
        self.tcess_threshold = tcess_threshold
        self.sch_cache_sizes = sch_cache_sizes
        self.max_elements = max_elements
        self.flush_bytes = flush_bytes
        self.sums: dict[tuple[int, int], _Sums] = {}
        self.layer_group: dict[int, tuple[int, int]] = {}
        self.residual: dict[int, torch.Tensor] = {}  # filled by collect_stats' norm pre-hooks
        self.residual_scale: float = 1.0
        self.sch = SCHBuffer()
        # (top-k ids, weights, activations) computed by the fused experts forward (see
        # fuse_experts), keyed by layer: reused instead of recomputing the experts
        self.pending: dict[int, tuple] = {}
        self.reused = 0
        self.kept: list[_Traffic] = []
        self.kept_bytes = 0
        self.out_sum: dict[int, torch.Tensor] = {}  # layer -> [E, H] float64 sum of routed expert outputs

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        li = layer.layer_idx
        pending = self.pending.pop(li, None)
        if pending is not None and pending[0] is routing.topk_idx:
            acts = pending[2]  # the forward already ran exactly these experts on exactly this routing
            self.reused += 1
        else:
            acts = routed_activations(layer, x, routing, self.max_elements, want_routed_output=True)
        h = self.residual.pop(li, None)
        h = x if h is None else h.reshape(-1, h.shape[-1])
        gram = _gram(h, acts.routed_output)
        acts.routed_output = None  # [T, H]: not kept
        t = _Traffic(li, routing.probs, routing.logits, routing.topk_idx, acts, gram)
        self.layer_group[li] = (layer.num_experts, routing.topk_idx.shape[1])
        self.kept.append(t)
        self.kept_bytes += t.nbytes
        if self.kept_bytes >= self.flush_bytes:
            self.flush()

    def end_batch(self) -> None:
        """Called by ``run_calibration`` after every batch."""
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Reduce every kept layer's traffic into the running sums (layers of equal shape at once)."""
        groups: dict[tuple, list[_Traffic]] = {}
        for t in self.kept:
            groups.setdefault(t.key, []).append(t)
        self.kept, self.kept_bytes = [], 0
        for items in groups.values():
            self._reduce(items)

    def _reduce(self, items: list[_Traffic]) -> None:
        L = len(items)
        T, E = items[0].probs.shape
        k = items[0].topk_idx.shape[1]
        dev = items[0].probs.device
        ids = [t.layer_idx for t in items]
        acc = self.sums.get((E, k))
        if acc is None:
            acc = self.sums[(E, k)] = _Sums(E, k, self.segment_len, dev)
        rows = acc.rows(ids)
        a = acc.t
        for li in ids:
            acc.tokens[acc.row[li]] += T

        # --- routing-only statistics ------------------------------------------------
        probs = torch.stack([t.probs for t in items])  # [L, T, E]
        idx = torch.stack([t.topk_idx for t in items])  # [L, T, k]
        a["soft"][rows] += probs.sum(1, dtype=torch.float64)
        hit = torch.zeros(L, T, E, dtype=torch.float32, device=dev).scatter_(2, idx, 1.0)
        a["coact"][rows] += torch.bmm(hit.transpose(1, 2), hit).double()  # exact: counts <= T < 2**24
        p = probs.double()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        a["entropy"][rows] += torch.special.entr(p).sum((1, 2))  # entr(p) = -p log p, 0 at p = 0
        top_logits, top_idx = torch.stack([t.logits for t in items]).topk(k, dim=-1)
        local = torch.softmax(top_logits.double(), dim=-1)
        local = local.masked_fill_(local < self.tcess_threshold, 0.0).float()
        a["tcess"][rows] += torch.zeros_like(hit).scatter_(2, top_idx, local).sum(1, dtype=torch.float64)

        # --- local routing consistency (per sequence of seq_len tokens) --------------
        seqs = idx.view(L, -1, self.seq_len, k)
        hist, windows = srp_histograms(hit.view(L, -1, self.seq_len, E), self.segment_len)
        a["srp_hist"][rows] += hist
        for i, li in enumerate(ids):
            acc.srp_windows[acc.row[li]] += windows
            self.sch.add(li, seqs[i], E)

        # --- statistics on the routed experts' activations ---------------------------
        offsets = torch.stack([t.acts.offsets for t in items])  # [L, E + 1]
        a["count"][rows] += offsets.diff(dim=1)
        expert = torch.stack([t.acts.expert for t in items])  # [L, P]
        for name, field in (("in_max", "row_in_max"), ("out_max", "row_out_max"), ("out_top", "row_out_top")):
            rowmax = torch.stack([getattr(t.acts, field) for t in items])
            batch_max = torch.zeros(L, E, dtype=torch.float32, device=dev).scatter_reduce_(1, expert, rowmax, "amax")
            a[name][rows] = torch.maximum(a[name][rows], batch_max)
        # EASY-EP: s = max(0, 1 - cos(h, h + c r)) from the per-token dot products
        g = torch.stack([t.gram for t in items]).double()  # [L, T, 3]
        c = self.residual_scale
        hh, hr, rr = g[..., 0], c * g[..., 1], c * c * g[..., 2]
        after = (hh + 2 * hr + rr).clamp_min(0)
        cos = (hh + hr) / (hh * after).sqrt().clamp_min(1e-8)
        s = (1 - cos).clamp_min(0)
        weight = torch.stack([t.acts.weight for t in items])
        out_norm = torch.stack([t.acts.out_norm for t in items])
        contrib = out_norm if items[0].acts.weight_on_input else out_norm * weight.abs()
        token = torch.stack([t.acts.token for t in items])
        pairs = torch.stack([weight.double(), out_norm.double(), contrib.double(),
                             contrib.double() * s.gather(1, token), contrib.double().square()], dim=1)  # [L, 5, P]
        a["pair_sums"][rows] += segment_sums(pairs, offsets)
        for t in items:  # [E, H] each: kept per layer (the hidden size is not known to _Sums)
            prev = self.out_sum.get(t.layer_idx)
            self.out_sum[t.layer_idx] = t.acts.out_sum if prev is None else prev + t.acts.out_sum

    def fuse_experts(self, view) -> list:
        """Let the statistics' grouped expert computation *be* the experts' forward pass, so the
        experts run once instead of twice (forward + recompute). Applies to experts modules with
        transformers' standard ``(hidden_states, top_k_index, top_k_weights)`` interface;
        returns undo callables. The block output is the same up to float rounding (a different
        summation order of the same products).

        A streamed model's experts are wrapped by accelerate, whose hook onloads the weights
        around ``_old_forward``: the fused computation replaces ``_old_forward`` there, so it
        runs on the onloaded weights and the observer need not onload them a second time
        (:meth:`reads_weights`): half the transfers of offloaded experts per batch.
        """
        undo = []
        for layer in view:
            ex = layer.experts
            if layer.spec.weight_on_input:
                continue
            hooked = hasattr(ex, "_hf_hook") and "_old_forward" in ex.__dict__
            attr = "_old_forward" if hooked else "forward"
            if not hooked and "forward" in ex.__dict__:
                continue  # someone else's wrapper: leave it alone
            original = getattr(ex, attr)

            def forward(*args, _layer=layer, _orig=original, **kwargs):
                hidden = args[0] if args else kwargs.get("hidden_states")
                idx = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
                w = args[2] if len(args) > 2 else kwargs.get("top_k_weights", kwargs.get("routing_weights"))
                if (hidden is None or idx is None or w is None or hidden.dim() != 2 or idx.dim() != 2
                        or w.shape != idx.shape or idx.dtype.is_floating_point):
                    return _orig(*args, **kwargs)
                routing = Routing(logits=None, probs=None, topk_idx=idx, topk_weight=w.float())
                acts = routed_activations(_layer, hidden, routing, self.max_elements, want_routed_output=True)
                self.pending[_layer.layer_idx] = (idx, w, acts)
                return acts.routed_output

            if hooked:
                ex._old_forward = forward
                undo.append(lambda ex=ex, orig=original: setattr(ex, "_old_forward", orig))
            else:
                ex.forward = forward
                undo.append(lambda ex=ex: ex.__dict__.pop("forward", None))
        return undo

    def reads_weights(self, layer: MoELayer) -> bool:
        """Whether :meth:`observe` will read ``layer``'s weights (``run_calibration`` onloads a
        streamed layer only then): not when the fused forward already computed its experts."""
        return layer.layer_idx not in self.pending

    def finalize(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per MoE layer: name -> tensor (float32 except ``count`` / ``coactivation`` int64)."""
        from .locality import srp_from_histogram
        from .super_experts import super_expert_mask

        self.flush()
        out: dict[int, dict[str, torch.Tensor]] = {}
        sch = self.sch.finalize(self.segment_len, self.sch_cache_sizes)
        for li in sorted(self.layer_group):
            acc = self.sums[self.layer_group[li]]
            r = acc.row[li]
            tokens = max(acc.tokens[r], 1)
            a = {name: t[r].cpu() for name, t in acc.t.items()}
            cnt = a["count"].double()
            used = cnt.clamp_min(1)
            mean = cnt.mean()
            cv = cnt.std(unbiased=False) / mean if mean > 0 else torch.zeros((), dtype=torch.float64)
            pair = {name: a["pair_sums"][:, i] for i, name in enumerate(PAIR_SUMS)}
            out[li] = {
                "count": a["count"],
                "soft_count": a["soft"].float(),
                "gate_mean": (pair["gate"] / used).float(),
                "ean": pair["ean"].float(),
                "reap": (pair["contrib"] / used).float(),
                "weighted_ean_sum": pair["contrib"].float(),
                "ean_mean": (pair["ean"] / used).float(),
                "reap_l2": (pair["contrib_sq"] / used).sqrt().float(),
                "ean_ca": torch.linalg.vector_norm(self.out_sum[li].cpu() / used[:, None], dim=1).float(),
                "max_activations": a["out_top"],
                "easy_ep": pair["easy"].float(),
                "tcess": (a["tcess"] / tokens).float(),
                "coactivation": a["coact"].round().long(),
                "entropy": (a["entropy"] / tokens).float(),
                "load_cv": cv.float(),
                "super_in_max": a["in_max"],
                "super_out_max": a["out_max"],
                "srp": srp_from_histogram(a["srp_hist"], acc.srp_windows[r], self.segment_len, acc.k),
                "sch": sch[li],
            }
        masks = super_expert_mask({li: d["super_out_max"] for li, d in out.items()})
        for li in out:
            out[li]["super_experts"] = masks[li]
        return out
