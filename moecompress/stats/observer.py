"""Accumulate per-expert routing statistics from :func:`moecompress.capture.run_calibration`.

One :class:`LayerAccumulator` per MoE layer sums, per batch, everything the statistics need
(all batched: index_add / scatter_reduce / matmul, no Python loop per token, no host sync).
Sums are kept in float64 so that results do not depend on the batch size beyond rounding.
Definitions (T = calibration tokens, k = top-k, g = routing weight the model gives a selected
expert, o = that expert's output for the token):

* ``count[e]``        number of tokens whose top-k contains e (sums to T * k).
* ``soft_count[e]``   sum over all tokens of the routing probability of e (softmax families:
                      sums to T; sigmoid families: sum of the sigmoid scores).
* ``gate_mean[e]``    mean of g over the tokens routed to e (0 for unused experts).
* ``ean[e]``          Expert Activation Norm, sum over routed tokens of ||o|| (L2): the
                      accumulated output norm of an expert over the tokens routed to it, as
                      EAN is described in "Finding Fantastic Experts in MoEs" (Jaiswal et al.,
                      2025) and used as a baseline by REAP. The paper's own equation could not
                      be consulted offline; this is our reading of it.
* ``reap[e]``         REAP saliency (Lasby et al., 2025, "REAP the Experts", Eq. 9):
                      S_e = 1/|X_e| * sum_{x in X_e} g_e(x) * ||f_e(x)||, X_e = tokens routed to e.
* ``easy_ep[e]``      EASY-EP output-aware importance (Dong et al., 2025, "Domain-Specific
                      Pruning of Large MoE Models with Few-shot Demonstrations", Sec. 3):
                      c_{e,t} = g_{e,t} * ||o_{e,t}||, s_t = max(0, 1 - cos(h_t, h_t + r_t)),
                      I(E_e) = sum_t c_{e,t} * s_t, where h_t is the residual stream entering the
                      MoE block and r_t the routed-experts output (shared experts excluded), as
                      in the authors' code (``simibr``).
* ``tcess[e]``        PreMoe task-conditioned expected selection score (Pei et al., 2025,
                      "PreMoe", probabilistic expert pruning): per token, a softmax over the
                      top-k router *logits* p~_t; s_{t,e} = p~_{t,e} if e is in the top-k
                      logits and p~_{t,e} >= r, else 0; TCESS_e = 1/T * sum_t s_{t,e}
                      (r = ``tcess_threshold``, default 0, k = the model's top-k).
                      Interpretation: the paper text was not available offline; the authors'
                      code (JarvisPei/PreMoe, collect_utils.py) selects the top-k logits, keeps
                      those whose local softmax is >= r and averages a per-token marker over
                      tokens (it stores the raw logit as the marker); we average the local
                      probability, which is what an *expected selection score* measures.
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

import torch

from ..arch import MoELayer, Routing
from .grouped import routed_activations
from .locality import SCHBuffer, srp_histogram


class LayerAccumulator:
    def __init__(self, num_experts: int, top_k: int, device, segment_len: int):
        E = num_experts
        f64 = dict(dtype=torch.float64, device=device)
        self.E, self.k = E, top_k
        self.tokens = 0
        self.count = torch.zeros(E, dtype=torch.int64, device=device)
        self.soft = torch.zeros(E, **f64)
        self.gate = torch.zeros(E, **f64)
        self.ean = torch.zeros(E, **f64)
        self.contrib = torch.zeros(E, **f64)
        self.easy = torch.zeros(E, **f64)
        self.tcess = torch.zeros(E, **f64)
        self.coact = torch.zeros(E, E, **f64)
        self.entropy = torch.zeros((), **f64)
        self.in_max = torch.zeros(E, dtype=torch.float32, device=device)
        self.out_max = torch.zeros(E, dtype=torch.float32, device=device)
        self.srp_hist = torch.zeros(segment_len + 1, dtype=torch.int64, device=device)
        self.srp_windows = 0


class StatsObserver:
    """Observer for :func:`run_calibration`; call :meth:`finalize` after the run."""

    def __init__(self, seq_len: int, *, segment_len: int = 16, tcess_threshold: float = 0.0,
                 sch_cache_sizes: tuple[int, ...] | None = None, max_elements: int | None = None):
        self.seq_len = seq_len
        self.segment_len = min(segment_len, seq_len)
        self.tcess_threshold = tcess_threshold
        self.sch_cache_sizes = sch_cache_sizes
        self.max_elements = max_elements
        self.acc: dict[int, LayerAccumulator] = {}
        self.residual: dict[int, torch.Tensor] = {}  # filled by collect_stats' norm pre-hooks
        self.residual_scale: float = 1.0
        self.sch = SCHBuffer()
        # (top-k ids, weights, activations) computed by the fused experts forward (see
        # fuse_experts), keyed by layer: reused instead of recomputing the experts
        self.pending: dict[int, tuple] = {}
        self.reused = 0

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        li = layer.layer_idx
        E, k = layer.num_experts, routing.topk_idx.shape[1]
        a = self.acc.get(li)
        if a is None:
            a = self.acc[li] = LayerAccumulator(E, k, x.device, self.segment_len)
        T = x.shape[0]
        idx = routing.topk_idx
        a.tokens += T

        # --- routing-only statistics ------------------------------------------------
        flat = idx.reshape(-1)
        a.count.index_add_(0, flat, torch.ones_like(flat))  # not bincount: no host sync on GPU
        a.soft += routing.probs.sum(0, dtype=torch.float64)
        a.gate.index_add_(0, flat, routing.topk_weight.reshape(-1).double())
        hit = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_(1, idx, 1.0)
        a.coact += (hit.T @ hit).double()  # exact: integer counts <= T < 2**24 per batch
        p = routing.probs.double()
        p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
        a.entropy += -(p * torch.log(p.clamp_min(1e-300))).sum()
        top_logits, top_idx = routing.logits.topk(k, dim=-1)
        local = torch.softmax(top_logits.double(), dim=-1)
        local = torch.where(local >= self.tcess_threshold, local, torch.zeros_like(local))
        a.tcess.index_add_(0, top_idx.reshape(-1), local.reshape(-1))

        # --- local routing consistency (per sequence of seq_len tokens) --------------
        seqs = idx.reshape(-1, self.seq_len, k)
        hist, windows = srp_histogram(seqs, E, self.segment_len)
        a.srp_hist += hist
        a.srp_windows += windows
        self.sch.add(li, seqs, E)

        # --- statistics on the routed experts' activations ---------------------------
        pending = self.pending.pop(li, None)
        if pending is not None and pending[0] is routing.topk_idx:
            acts = pending[2]  # the forward already ran exactly these experts on exactly this routing
            self.reused += 1
        else:
            acts = routed_activations(layer, x, routing, self.max_elements, want_routed_output=True)
        a.ean.index_add_(0, acts.expert, acts.out_norm.double())
        a.contrib.index_add_(0, acts.expert, acts.contribution_norm.double())
        a.in_max = torch.maximum(a.in_max, acts.in_absmax)
        a.out_max = torch.maximum(a.out_max, acts.out_absmax)
        h = self.residual.pop(li, None)
        h = (x if h is None else h.reshape(-1, h.shape[-1])).float()
        after = h + self.residual_scale * acts.routed_output.float()
        s = (1 - torch.nn.functional.cosine_similarity(h, after, dim=-1)).clamp_min(0)
        a.easy.index_add_(0, acts.expert, (acts.contribution_norm * s[acts.token]).double())

    def fuse_experts(self, view) -> list:
        """Let the statistics' grouped expert computation *be* the experts' forward pass, so the
        experts run once instead of twice (forward + recompute). Applies to experts modules with
        transformers' standard ``(hidden_states, top_k_index, top_k_weights)`` interface that
        are not dispatched by accelerate; returns undo callables. The block output is the same
        up to float rounding (a different summation order of the same products)."""
        undo = []
        for layer in view:
            ex = layer.experts
            if layer.spec.weight_on_input or hasattr(ex, "_hf_hook") or "forward" in ex.__dict__:
                continue
            original = ex.forward

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

            ex.forward = forward
            undo.append(lambda ex=ex: ex.__dict__.pop("forward", None))
        return undo

    def finalize(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per MoE layer: name -> tensor (float32 except ``count`` / ``coactivation`` int64)."""
        from .locality import srp_from_histogram
        from .super_experts import super_expert_mask

        out: dict[int, dict[str, torch.Tensor]] = {}
        sch = self.sch.finalize(self.segment_len, self.sch_cache_sizes)
        for li, a in sorted(self.acc.items()):
            cnt = a.count.double()
            used = cnt.clamp_min(1)
            mean = cnt.mean()
            cv = cnt.std(unbiased=False) / mean if mean > 0 else torch.zeros((), dtype=torch.float64)
            out[li] = {
                "count": a.count.cpu(),
                "soft_count": a.soft.float().cpu(),
                "gate_mean": (a.gate / used).float().cpu(),
                "ean": a.ean.float().cpu(),
                "reap": (a.contrib / used).float().cpu(),
                "easy_ep": a.easy.float().cpu(),
                "tcess": (a.tcess / max(a.tokens, 1)).float().cpu(),
                "coactivation": a.coact.round().long().cpu(),
                "entropy": (a.entropy / max(a.tokens, 1)).float().cpu(),
                "load_cv": cv.float().cpu(),
                "super_in_max": a.in_max.cpu(),
                "super_out_max": a.out_max.cpu(),
                "srp": srp_from_histogram(a.srp_hist.cpu(), a.srp_windows, self.segment_len, a.k),
                "sch": sch[li],
            }
        masks = super_expert_mask({li: d["super_out_max"] for li, d in out.items()})
        for li in out:
            out[li]["super_experts"] = masks[li]
        return out
