"""Least-squares re-fit of the merged experts' down projections (our addition to the papers).

Merging by weight averaging is lossy, and with one router row per merged expert the routing
changes too. This step re-fits, in closed form, each merged expert's down projection so the
merged layer reproduces the *original* layer's routed output on calibration tokens — the
layer-wise reconstruction objective of post-training compression (as in OBC/GPTQ/SparseGPT),
applied to the merged experts; no gradient steps.

For merged layer inputs ``x_t`` (the merged model's own activations, so errors of earlier
layers are seen), routing weights ``a_{t,c}`` of the merged router and the residual
``e_t = y_orig(x_t) - y_merged(x_t)`` (shared experts cancel), the residual is shared among the
experts a token selected in proportion to their weights, ``s_{t,c} = a_{t,c} / sum_j a_{t,j}``,
and each selected expert ``c`` solves the ridge problem

    min_dD  sum_t || F_{t,c} dD^T - s_{t,c} e_t ||^2 + lam * tr(F_c^T F_c)/I * ||dD||^2

with ``F_{t,c} = a_{t,c} h_c(x_t)`` (``h_c(a_{t,c} x_t)`` for Llama-4, whose routing weight
scales the expert input), i.e. ``dD^T = (F^T F + lam' I)^-1 F^T (s e)``, then ``D_c += dD``.
This is one Jacobi step on the joint least-squares problem over all merged experts: it needs
only an [I, I] and an [I, H] accumulator per expert, never the stored activations.

Memory: the accumulators of one layer are 4 * E' * I * (I + H) bytes (402 MB for OLMoE-1B-7B
merged to 32 experts; all 16 layers at once took a streamed merge to 9.5 GiB of GPU memory under
a 4 GiB cap on an H100). Layers are therefore re-fitted in groups whose accumulators fit
``ACCUMULATOR_BUDGET``; later groups see the earlier groups re-fitted (layer-wise sequential,
as GPTQ). The calibration activations are carried from group to group (``capture.LayerCursor``):
each layer runs twice in all, observed and then with its re-fitted weights.
The grouping depends only on the model's shape, never on memory caps, so a streamed run and an
in-memory run re-fit the same way.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import NamedTuple

import torch
from torch import nn

from .arch import MoELayer, MoEModel, Routing, moe_view
from .capture import LayerCursor, moved
from .onload import is_streamed, onloaded


def block_output(block: nn.Module, x: torch.Tensor, max_tokens: int | None = None) -> torch.Tensor:
    """[T, H] output of an MoE block module on tokens ``x`` [T, H], ``max_tokens`` at a time
    (``block_tokens``): the block's own forward holds a few rows per routed token (gathered
    inputs, gate/up, activation, outputs), and it runs while the pruned layer's pass holds its
    own, so unsliced it took a streamed Qwen3-30B-shape prune past its GPU cap (docs/benchmarks.md,
    "Session 15"). The tokens are independent: the slices' outputs are the whole batch's rows."""
    def run(xs: torch.Tensor) -> torch.Tensor:
        out = block(xs[None])
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(-1, x.shape[-1])

    if max_tokens is None or x.shape[0] <= max_tokens:
        return run(x)
    return torch.cat([run(xs) for xs in x.split(max_tokens)])


def block_tokens(layer: MoELayer) -> int:
    """Tokens of one ``block_output`` slice: their routed rows (``top_k`` per token) within a
    feature block's (``BLOCK_WORK_ELEMENTS``), whose transient the stages' GPU reserve counts
    (``block_working_bytes``) and which is freed before the features are computed."""
    return max(1, block_rows(layer.hidden_size, layer.intermediate_size) // max(layer.top_k, 1))


ACCUMULATOR_BUDGET = 1 << 30  # bytes of re-fit accumulators held at once (one layer at least)
SOLVE_BUDGET = 1 << 31  # float64 bytes of the per-expert solves batched at once without a GPU cap (one expert at least)


def accumulator_bytes(layer: MoELayer) -> int:
    """Bytes of one layer's re-fit accumulators (float32 [E', I, I] + [E', I, H])."""
    return 4 * layer.num_experts * layer.intermediate_size * (layer.intermediate_size + layer.hidden_size)


def layer_groups(view: MoEModel, budget: int | None = None) -> list[list[MoELayer]]:
    """Consecutive MoE layers whose accumulators fit ``budget`` together (at least one each)."""
    budget = ACCUMULATOR_BUDGET if budget is None else budget
    groups: list[list[MoELayer]] = []
    size = 0
    for layer in view:
        b = accumulator_bytes(layer)
        if not groups or size + b > budget:
            groups.append([])
            size = 0
        groups[-1].append(layer)
        size += b
    return groups


def peak_accumulator_bytes(view: MoEModel, keep: int) -> int:
    """Most re-fit accumulator bytes held at once when ``view``'s layers keep ``keep`` experts."""
    sizes = [accumulator_bytes(layer) * keep // max(layer.num_experts, 1) for layer in view]
    return max(min(ACCUMULATOR_BUDGET, sum(sizes)), max(sizes, default=0))


def solve_bytes(unknowns: int, hidden: int) -> int:
    """Float64 bytes of one ``ridge_solve`` of ``unknowns`` features and ``hidden`` right-hand
    sides: the system, its Cholesky factor and inverse, the right-hand sides and their product."""
    return 8 * (3 * unknowns * unknowns + 2 * unknowns * hidden)


def ridge_solve(gram: torch.Tensor, lam: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(G + diag(lam))^-1 rhs`` in float64, for a Gram matrix ``G`` (symmetric positive
    semi-definite; its lower triangle is read) and a ridge ``lam > 0``: the inverse from the
    Cholesky factor, then one matrix product with the H right-hand sides, instead of
    ``linalg.solve``'s LU substitutions over those H columns. On an H200 (``bench/ridge_solve_speed.py``,
    docs/benchmarks.md): 1.6 ms instead of 3.4 ms per expert of the OLMoE-1B-7B shape (I 1024,
    H 2048), 4.2 ms instead of 10.7 ms for DeepSeek-V3's (2048, 7168), results within 6e-15 of
    LU's (relative). The system is positive definite, so the inverse's error is of order
    cond * eps in float64, far below the rounding of the weights it corrects. Where the
    factorisation fails (no ridge and a singular Gram matrix), LU as before. Batched over
    leading dimensions (``gram`` [..., n, n], ``lam`` [..., n], ``rhs`` [..., n, H]), with one
    wait for the device for the factorisations' status."""
    a = gram.double() + torch.diag_embed(lam.double())
    factor, info = torch.linalg.cholesky_ex(a)
    failed = info != 0
    if not bool(failed.any()):
        return torch.cholesky_inverse(factor) @ rhs.double()
    if a.dim() == 2:
        return torch.linalg.solve(a, rhs.double())
    out = torch.cholesky_inverse(factor) @ rhs.double()
    out[failed] = torch.linalg.solve(a[failed], rhs.double()[failed])
    return out


# On CUDA, the re-fit's normal equations (F^T F and F^T e, float32) are accumulated with TF32
# products: inputs rounded to 10 mantissa bits, sums in float32. The features are the bf16 model's
# expert activations (8 mantissa bits, exact in TF32) times a float32 routing weight, so the
# rounding is one relative 2^-11 per product of a feature, unbiased, averaged over thousands of
# tokens in every entry, and far below the ridge (1e-2 or 1e-1 of the mean diagonal) and the bf16
# rounding of the corrected weights. Measured on an H200 (docs/benchmarks.md, "Session 13",
# bench/refit_precision.py): the testbed's re-fitted prunes have the same perplexities to 0.001
# either way, jointly and per expert. Why: float32 runs at a tenth of TF32's rate on tensor cores,
# and a DeepSeek-V3-shape layer's right-hand sides alone are about 1 TFLOP per 4k-token batch
# (the per-expert observation of the OLMoE shape, launch-bound then, did not move). The CPU has no
# TF32: unchanged there.
TF32_ACCUMULATION = True


@contextlib.contextmanager
def accumulation_precision(device: torch.device):
    """Float32 matrix products on ``device`` in TF32 while active (CUDA and ``TF32_ACCUMULATION``)."""
    if device.type != "cuda" or not TF32_ACCUMULATION:
        yield
        return
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")  # torch >= 2.9; allow_tf32 is deprecated there
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        yield
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before


def slots_by_expert(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat top-k slots (t * k + j) sorted by expert, each expert's in row-major order (one
    stable sort), and the slots per expert [E], both on ``topk_idx``'s device."""
    flat = topk_idx.reshape(-1)
    return torch.sort(flat, stable=True).indices, torch.bincount(flat, minlength=num_experts)


def residual_shares(weights: torch.Tensor) -> torch.Tensor:
    """[T, k] each selected expert's share of a token's residual, ``a / sum(a)`` (1 / k where
    a token's weights sum to 0)."""
    w = weights.float()
    total = w.sum(1, keepdim=True)
    safe = torch.where(total != 0, total, torch.ones_like(total))
    return torch.where(total != 0, w / safe, 1.0 / w.shape[1])


def routed_slots(topk_idx: torch.Tensor, num_experts: int):
    """Per routed expert ``c`` (ascending): the tokens that chose it and in which top-k slot,
    as ``(topk_idx == c).nonzero(as_tuple=True)`` gives them (row-major order), from one stable
    sort and one host sync for all experts instead of a sync per expert."""
    order, counts = slots_by_expert(topk_idx, num_experts)
    counts = counts.tolist()
    tok_all, pos_all = order // topk_idx.shape[1], order % topk_idx.shape[1]
    start = 0
    for c, n in enumerate(counts):
        if n:
            yield c, tok_all[start:start + n], pos_all[start:start + n]
            start += n


def expert_features(layer: MoELayer, x: torch.Tensor, routing: Routing):
    """Per routed expert ``c``: its tokens, the features ``F = a * h_c(x)`` [n, I] of the re-fit
    (``h_c(a * x)`` for Llama-4) and each token's residual share ``a / sum(a)`` [n]."""
    w = routing.topk_weight.float()
    share = residual_shares(w)
    for c, tok, pos in routed_slots(routing.topk_idx, layer.num_experts):
        a = w[tok, pos]
        xc = x[tok]
        if layer.spec.weight_on_input:
            feat = layer.expert_hidden(c, xc * a[:, None].to(xc.dtype)).float()
        else:
            feat = layer.expert_hidden(c, xc).float() * a[:, None]
        yield c, tok, feat, share[tok, pos]


# Blocks of experts in the per-expert re-fit (``expert_feature_blocks``). Measured on an H200
# (docs/benchmarks.md, "Session 13"; 4 layers, 16 x 512-token batches): the observation of a
# Qwen3-30B-shape layer took 0.57 s per layer expert by expert, 0.54 s in blocks padded at most
# 1.25x, 0.19 s in blocks padded at most 2x with widths rounded to 256 rows (fewer distinct
# product shapes: each new one costs the host more than the product costs the GPU); OLMoE's
# shape 0.48, 0.31 and 0.18 s. Half these working elements cost 0.1 s more per layer.
BLOCK_WORK_ELEMENTS = 1 << 25  # rows x (hidden + intermediate) of one block (working_bytes counts it)
BLOCK_PADDING = 2.0  # a block's padded rows at most this many times its routed rows
BLOCK_ROW_MULTIPLE = 256  # a block's width rounded up to a multiple of this
# Without a GPU cap (a model in GPU memory) a block may hold up to 1/256 of the GPU's memory in
# elements, at most this many (about 11 bytes per element: 3 GiB). On the OLMoE-1B-7B shape a
# batch's 32 kept experts then take 2 blocks instead of 18: the observation had kept the GPU
# busy for 8 of its 28 ms per batch, the rest spent launching 18 blocks' kernels (session 16).
UNCAPPED_BLOCK_ELEMENTS = 1 << 28


def block_rows(hidden: int, inter: int, elements: int | None = None) -> int:
    """Rows of one block at most (padded rows of its experts; ``elements`` of working tensors,
    ``BLOCK_WORK_ELEMENTS`` by default: what a GPU cap's reserve counts)."""
    return max(1, (BLOCK_WORK_ELEMENTS if elements is None else elements) // (hidden + inter))


def uncapped_block_elements(device: torch.device) -> int:
    """A block's working elements where no GPU cap bounds them: ``BLOCK_WORK_ELEMENTS`` off a
    GPU, else up to 1/256 of the GPU's memory (a property of the device, not of its free
    memory at the time: the same inputs give the same blocks) and ``UNCAPPED_BLOCK_ELEMENTS``."""
    if device.type != "cuda":
        return BLOCK_WORK_ELEMENTS
    total = torch.cuda.get_device_properties(device).total_memory
    return max(BLOCK_WORK_ELEMENTS, min(UNCAPPED_BLOCK_ELEMENTS, total // 256))


def block_working_bytes(hidden: int, inter: int) -> int:
    """Transient bytes of one block at most: per padded row its gathered input (bf16), gate, up
    and activation (bf16), features (two float32 copies) and gathered, scaled residual (float32)."""
    return block_rows(hidden, inter) * (10 * hidden + 14 * inter)


def block_width(rows: int) -> int:
    """A block's rows per expert for ``rows`` routed to its widest expert (``BLOCK_ROW_MULTIPLE``)."""
    m = BLOCK_ROW_MULTIPLE
    return -(-rows // m) * m


def expert_blocks(counts: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Consecutive experts ``[e0, e1)`` with routed tokens, grouped so that one batched product
    serves each group: its experts' rows padded to the group's largest count (``block_width``)
    stay within ``max_rows`` (or one expert) and within ``BLOCK_PADDING`` times the rows routed.
    Experts that no token chose are in no group."""
    blocks, e, num = [], 0, len(counts)
    while e < num:
        if counts[e] == 0:
            e += 1
            continue
        e1, widest, rows = e + 1, counts[e], counts[e]
        while e1 < num and counts[e1] > 0:
            w = max(widest, counts[e1])
            padded = (e1 + 1 - e) * block_width(w)
            if padded > max_rows or padded > BLOCK_PADDING * (rows + counts[e1]):
                break
            widest, rows, e1 = w, rows + counts[e1], e1 + 1
        blocks.append((e, e1))
        e = e1
    return blocks


class FeatureBlock(NamedTuple):
    """The re-fit's features of experts ``e0..e1-1`` on one batch, each expert's routed tokens
    padded to ``width`` rows: ``tok`` [n, width] (the tokens; padding repeats a valid index),
    ``feat`` [n, width, I] float32 (``expert_features``' rows, exactly 0 on padding; or only the
    routed rows, [rows, I], while held for a stream target: ``packed``/``unpacked``), ``share``
    [n, width] (each token's residual share, 0 on padding), ``counts`` [n] (CPU), ``rows`` the
    positions of the routed rows among the n x width."""
    e0: int
    e1: int
    tok: torch.Tensor
    feat: torch.Tensor
    share: torch.Tensor
    counts: torch.Tensor
    rows: torch.Tensor

    def packed(self) -> FeatureBlock:
        """Without the padding rows: what a batch's features cost while they wait is what the
        per-expert loop held (the activation share counts that), not up to ``BLOCK_PADDING`` times it."""
        return self._replace(feat=self.feat.reshape(-1, self.feat.shape[-1])[self.rows])

    def unpacked(self) -> torch.Tensor:
        """``feat`` [n, width, I], padded again where it was packed."""
        if self.feat.dim() == 3:
            return self.feat
        full = self.feat.new_zeros(self.tok.numel(), self.feat.shape[-1]).index_copy_(0, self.rows, self.feat)
        return full.view(*self.tok.shape, -1)


def expert_feature_blocks(layer: MoELayer, x: torch.Tensor, routing: Routing, elements: int | None = None):
    """``expert_features`` computed for groups of experts at once (``expert_blocks``, each
    within ``elements`` working elements, by default ``BLOCK_WORK_ELEMENTS``): each group's
    gate/up products are one batched product and its accumulations one more, instead of a
    handful of small kernels per expert, which on a GPU left the re-fit waiting on launches
    (128-256 experts per layer). The same rows as ``expert_features``, padded with zeros."""
    w = routing.topk_weight.float()
    share = residual_shares(w)
    k = routing.topk_idx.shape[1]
    order, on_device = slots_by_expert(routing.topk_idx, layer.num_experts)
    dev = order.device
    counts = on_device.tolist()  # the one host sync per batch: nothing below copies to the device
    # (a copy from host memory would wait for the device: a sync per block)
    starts = on_device.cumsum(0) - on_device
    for e0, e1 in expert_blocks(counts, block_rows(layer.hidden_size, layer.intermediate_size, elements)):
        width = block_width(max(counts[e0:e1]))
        column = torch.arange(width, device=dev)
        valid = column[None, :] < on_device[e0:e1, None]  # [n, width]
        at = starts[e0:e1, None] + column[None, :]
        slot = order[torch.where(valid, at, at[:, :1])]  # padding: the expert's first slot again
        tok, pos = slot // k, slot % k
        a = torch.where(valid, w[tok, pos], 0.0)
        xs = x[tok]
        if layer.spec.weight_on_input:
            h = layer.experts_hidden(xs * a[..., None].to(xs.dtype), e0, e1).float()
        else:
            h = layer.experts_hidden(xs, e0, e1).float() * a[..., None]
        feat = torch.where(valid[..., None], h, 0.0)
        routed = sum(counts[e0:e1])  # known on the host: no sync for the sizes below
        local = torch.repeat_interleave(torch.arange(e1 - e0, device=dev), on_device[e0:e1], output_size=routed)
        first = starts[e0:e1] - starts[e0]
        rows = local * width + torch.arange(routed, device=dev) - first[local]
        yield FeatureBlock(e0, e1, tok, feat, torch.where(valid, share[tok, pos], 0.0), torch.tensor(counts[e0:e1]),
                           rows)


class RefitObserver:
    """Accumulates the normal equations of the re-fit, per merged layer and expert."""

    def __init__(self, originals: dict[int, nn.Module], stream: dict[int, list[torch.Tensor]] | None = None,
                 stream_weight: float = 1.0, pairs=None, sliced: bool = True):
        self.originals = originals  # layer_idx -> the unmerged MoE block (detached from the model); only these are observed
        # the original block runs block_tokens(layer) tokens at a time and the features go in
        # blocks of BLOCK_WORK_ELEMENTS (a GPU cap's reserve counts both), or with ``sliced`` off
        # (a model in memory: no cap) on the whole batch, which on the OLMoE-1B-7B shape took 1.0 s
        # instead of 2.0-2.2 s (docs/benchmarks.md, "Session 15"), with blocks of uncapped_block_elements
        self.sliced = sliced
        # layer_idx -> per batch, the original model's hidden states after that decoder layer:
        # where given, the target is the original residual stream (moecompress/repair.py), mixed
        # with the layer's own residual as stream_weight * e_stream + (1 - stream_weight) * e_layer,
        # and the right-hand side waits for the decoder layer's output (``layer_output``)
        self.stream = stream or {}
        self.stream_weight = stream_weight
        # blocktune.TunePairs: each batch's (x, y + e), e the residual fitted here (--repair refit+tune)
        self.pairs = pairs
        self._pending: dict[int, tuple] = {}
        self.gram: dict[int, torch.Tensor] = {}  # [E', I, I]  F^T F
        self.rhs: dict[int, torch.Tensor] = {}  # [E', I, H]  F^T (s e)
        self.tokens: dict[int, torch.Tensor] = {}  # [E'] tokens seen per expert
        # float64 sums on the layer's device, read once at the end: a read per batch would make
        # the host wait for the device twice per batch
        self.err: dict[int, torch.Tensor] = {}  # sum ||e||^2
        self.ref: dict[int, torch.Tensor] = {}  # sum ||original routed output||^2

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        li = layer.layer_idx
        if li not in self.originals:
            return
        self._begin(layer, x.device)
        resid = self._residual(layer, x, y)
        elements = BLOCK_WORK_ELEMENTS if self.sliced else uncapped_block_elements(x.device)
        feats = list(expert_feature_blocks(layer, x, routing, elements))
        for b in feats:
            with accumulation_precision(b.feat.device):
                self.gram[li][b.e0:b.e1].baddbmm_(b.feat.transpose(1, 2), b.feat)
            self.tokens[li][b.e0:b.e1] += b.counts
        if li in self.stream:  # held until the decoder layer's output
            feats = [b.packed() for b in feats]
        self._right_hand_side(li, feats, resid, x, y)

    def _accumulator_shapes(self, num: int, inter: int, hidden: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per expert: F^T F [E', I, I] and F^T (s e) [E', I, H]."""
        return (num, inter, inter), (num, inter, hidden)

    def _begin(self, layer: MoELayer, device: torch.device) -> None:
        """The layer's zeroed accumulators, at its first batch."""
        li = layer.layer_idx
        if li in self.gram:
            return
        gram, rhs = self._accumulator_shapes(layer.num_experts, layer.intermediate_size, layer.hidden_size)
        self.gram[li] = torch.zeros(gram, dtype=torch.float32, device=device)
        self.rhs[li] = torch.zeros(rhs, dtype=torch.float32, device=device)
        self.tokens[li] = torch.zeros(layer.num_experts, dtype=torch.long)
        self.err[li] = torch.zeros((), dtype=torch.float64, device=device)
        self.ref[li] = torch.zeros((), dtype=torch.float64, device=device)

    def _right_hand_side(self, li: int, feats, resid: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add this batch's features against the layer's residual to the right-hand side, or,
        with a stream target, keep them until the decoder layer's output is known."""
        if li in self.stream:
            self._pending[li] = (feats, resid, x, y)
        else:
            self._fitted(li, feats, resid, x, y)

    def _fitted(self, li: int, feats, e: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """The batch's target residual ``e`` is known: into the right-hand side (and the pairs)."""
        self._accumulate(li, feats, e)
        if self.pairs is not None:
            self.pairs.add(x, y.reshape(e.shape), e)

    def _accumulate(self, li: int, feats, resid: torch.Tensor) -> None:
        for b in feats:
            f = b.unpacked()
            with accumulation_precision(f.device):
                self.rhs[li][b.e0:b.e1].baddbmm_(f.transpose(1, 2), resid[b.tok] * b.share[..., None])

    def _stream_residual(self, layer_idx: int, batch: int, out: torch.Tensor, layer_resid: torch.Tensor) -> torch.Tensor:
        """The target residual [T, H] (float32): e = h_orig - h, the original model's hidden states
        after the decoder layer minus the compressed model's, mixed with the layer's own residual."""
        target = moved(self.stream[layer_idx][batch], out.device)  # from pinned memory: asynchronous
        e = (target.float() - out.float()).reshape(-1, out.shape[-1])
        w = self.stream_weight
        return e if w == 1.0 else w * e + (1 - w) * layer_resid

    @torch.no_grad()
    def layer_output(self, layer_idx: int, batch: int, out: torch.Tensor) -> None:
        pending = self._pending.pop(layer_idx, None)
        if pending is not None:
            feats, layer_resid, x, y = pending
            self._fitted(layer_idx, feats, self._stream_residual(layer_idx, batch, out, layer_resid), x, y)

    def _residual(self, layer: MoELayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """e = y_orig - y [T, H] (float32); adds to the layer's error and reference sums."""
        li = layer.layer_idx
        y_orig = block_output(self.originals[li], x, block_tokens(layer) if self.sliced else None).float()
        resid = y_orig - y.float()
        shared = layer.shared_forward(x)
        routed_orig = y_orig - shared.float() if shared is not None else y_orig
        self.err[li] += resid.double().square().sum()
        self.ref[li] += routed_orig.double().square().sum()
        return resid

    def onload_with(self, layer: MoELayer) -> list[nn.Module]:
        """The original block runs on the merged layer's inputs: onload it with the layer."""
        return [self.originals[layer.layer_idx]] if layer.layer_idx in self.originals else []

    @torch.no_grad()
    def apply(self, layer: MoELayer, ridge: float) -> None:
        """Solve each expert's ridge problem and add the correction to its down projection."""
        li = layer.layer_idx
        if li not in self.gram:
            return
        fitted = [c for c in range(layer.num_experts) if int(self.tokens[li][c]) > 0]  # (never routed: nothing to fit)
        # the experts' systems in batches of SOLVE_BUDGET bytes in GPU memory (one wait for the device
        # a batch, not two per expert: 53 ms a layer of the OLMoE-1B-7B shape, all 32 experts in one
        # batch), one at a time under a GPU cap, whose reserve counts one expert's float64 solve
        # (repair.working_bytes)
        chunk = 1 if self.sliced else max(1, SOLVE_BUDGET // solve_bytes(layer.intermediate_size, layer.hidden_size))
        for i in range(0, len(fitted), chunk):
            experts = fitted[i:i + chunk]
            # consecutive experts (the usual case) as a slice: an index list copied from host memory
            # would make the host wait for the device once more
            at = (slice(experts[0], experts[-1] + 1) if experts[-1] - experts[0] == len(experts) - 1
                  else torch.tensor(experts, device=self.gram[li].device))
            g = self.gram[li][at].double()
            lam = ridge * g.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True) + 1e-12
            delta = ridge_solve(g, lam.expand(-1, g.shape[-1]), self.rhs[li][at])  # [n, I, H] = dD^T
            for j, c in enumerate(experts):
                down = layer.down_proj[c]
                down.copy_((down.double() + delta[j].T.to(down.device)).to(down.dtype))

    def relative_error(self, layer_idx: int) -> float | None:
        """||y_orig - y_merged||^2 / ||routed y_orig||^2 over the calibration tokens (before the re-fit)."""
        if layer_idx not in self.err or float(self.ref[layer_idx]) == 0:
            return None
        return float(self.err[layer_idx]) / float(self.ref[layer_idx])



JOINT_MAX_FEATURES = 4096  # E' * I: the joint Gram is float32 [4096, 4096] = 64 MiB at most


class JointRefitObserver(RefitObserver):
    """The same least-squares problem solved jointly over all experts of a layer (exact, not
    one Jacobi step): unknowns ``dD_c`` for every expert at once, features ``F_t`` the
    concatenation over experts of ``a_{t,c} h_c(x_t)`` (zero for unselected experts) and the
    whole residual ``e_t`` as target, ``min sum_t ||e_t - sum_c dD_c F_{t,c}||^2 + ridge``; the
    ridge of each expert's block is ``ridge * mean(diag of its block)``, as in the Jacobi step.
    Used where ``E' * I <= JOINT_MAX_FEATURES`` (the Gram is that squared)."""

    def _accumulator_shapes(self, num: int, inter: int, hidden: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """All experts at once: F^T F [E' I, E' I] and F^T e [E' I, H]."""
        return (num * inter, num * inter), (num * inter, hidden)

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        li, num, inter = layer.layer_idx, layer.num_experts, layer.intermediate_size
        if li not in self.originals:
            return
        self._begin(layer, x.device)
        resid = self._residual(layer, x, y)
        feats = torch.zeros(x.shape[0], num * inter, dtype=torch.float32, device=x.device)
        for c, tok, feat, _ in expert_features(layer, x, routing):
            feats[tok, c * inter:(c + 1) * inter] = feat
            self.tokens[li][c] += tok.numel()
        with accumulation_precision(feats.device):
            self.gram[li] += feats.T @ feats
        self._right_hand_side(li, feats, resid, x, y)

    def _accumulate(self, li: int, feats: torch.Tensor, resid: torch.Tensor) -> None:
        with accumulation_precision(feats.device):
            self.rhs[li] += feats.T @ resid

    @torch.no_grad()
    def apply(self, layer: MoELayer, ridge: float) -> None:
        li = layer.layer_idx
        if li not in self.gram:
            return
        num, inter = layer.num_experts, layer.intermediate_size
        g = self.gram[li].double()
        block_mean = g.diagonal().reshape(num, inter).mean(1)  # per expert
        lam = (ridge * block_mean + 1e-12).repeat_interleave(inter)
        delta = ridge_solve(g, lam, self.rhs[li])  # [E' I, H]
        for c in range(num):
            if int(self.tokens[li][c]) == 0:
                continue
            down = layer.down_proj[c]
            down.copy_((down.double() + delta[c * inter:(c + 1) * inter].T.to(down.device)).to(down.dtype))


def swap_in_copies(model, view: MoEModel | None = None) -> dict[int, nn.Module]:
    """Replace every MoE block of ``model`` (held in memory) by a copy (the one to compress)
    and return the untouched originals, the re-fit's reference. Peak memory: the originals
    plus one block. (merge_experts builds its merged blocks itself, one layer at a time.)"""
    view = view or moe_view(model)
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    originals = {}
    for layer in view:
        originals[layer.layer_idx] = layer.block
        setattr(decoder_layers[layer.layer_idx], view.spec.moe_block, copy.deepcopy(layer.block))
    return originals


@torch.no_grad()
def refit_to_original(model, originals: dict[int, nn.Module], tokens: torch.Tensor, *, ridge: float,
                      batch_size: int = 8, progress: bool = True,
                      budget: int | None = None) -> dict[int, float | None]:
    """Re-fit the down projections of ``model``'s (compressed) experts so each MoE layer
    reproduces ``originals[layer_idx]`` on the calibration ``tokens``; returns each layer's
    relative routed-output error before the re-fit. Works for any edit that leaves one router
    row per expert (merging, or pruning). Layers go in groups of at most ``budget`` bytes of
    accumulators (default ``ACCUMULATOR_BUDGET``; see the module docstring)."""
    from .merge.offload import write_back  # merge imports this module: imported here, not at the top

    view = moe_view(model)
    budget = ACCUMULATOR_BUDGET if budget is None else budget
    errors = {}
    groups = [[layer for layer in group if layer.layer_idx in originals] for group in layer_groups(view, budget)]
    groups = [g for g in groups if g]
    if not groups:
        return errors
    # The calibration activations move through the model a layer at a time: each group is
    # observed, re-fitted, then run again with its new weights for the next group.
    cursor = LayerCursor(model, tokens, batch_size=batch_size, view=view, until=groups[-1][-1].layer_idx)
    streamed = is_streamed(model)  # the original block in slices of the batch under a GPU cap only
    for i, group in enumerate(groups):
        obs = RefitObserver({layer.layer_idx: originals[layer.layer_idx] for layer in group}, sliced=streamed)
        label = "least-squares re-fit" + (f" (layers {group[0].layer_idx}-{group[-1].layer_idx}, group {i + 1}/{len(groups)})"
                                          if len(groups) > 1 else "")
        with cursor.editing(group[-1].layer_idx, [obs], progress=progress, description=label):
            for layer in group:
                with onloaded(layer.block):  # a streamed model's merged block: onload, edit, save
                    obs.apply(layer, ridge)
                    write_back(layer.block, [layer.down_proj])
                errors[layer.layer_idx] = obs.relative_error(layer.layer_idx)
            obs.gram.clear()  # free the accumulators before the group runs again
            obs.rhs.clear()
    return errors
