"""Repair after removal: re-fit what is left of each MoE layer to the original layer's output.

Any stage that removes experts (pruning, merging) changes a layer's output twice: the removed
experts' contributions are gone, and the router now picks its top-k among the kept experts only.
``repair(model, original, tokens)`` moves through the compressed model a layer at a time with the
calibration activations (``capture.LayerCursor``; every layer sees the inputs produced by the
already repaired layers before it) and fits, in closed form, on the calibration tokens ``x_t``:

* ``refit`` — the kept experts' down projections (:mod:`moecompress.refit`): ridge least
  squares solved jointly over all kept experts of the layer where ``kept * I <= 4096``
  (``JointRefitObserver``, exact), else the merge's per-expert step (residual shared among a
  token's selected experts by routing weight);
* ``refit+router`` — first the kept experts' router rows, then the down projections as above;
* ``refit+tune`` — the down projections as above, then the kept experts' weights and router
  weight tuned by backpropagation to the same target, block by block (EBFT;
  :mod:`moecompress.blocktune`), from the pairs recorded in the same pass.

Target (``target``, ``--repair-target``). ``stream``: the original model's hidden states after
the decoder layer, ``h_orig``, on the original model's own activations; the re-fitted down
projections absorb the residual ``e_t = h_orig,t - h_t`` of the compressed model's decoder-layer
output ``h_t``, so what earlier layers (and this layer's attention) drifted is corrected where it
can be, not only this layer's own loss. This is the asymmetric calibration of GPTAQ (Li et al.,
"GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", ICML 2025, Eq. 5: the
compressed layer on its own inputs is fitted to the full-precision layer on the full-precision
inputs), lifted to the decoder layer's output since only the MoE block is re-fitted (the MoE
output is added to the residual stream, so the residual is linear in the down projections as
before). ``layer``: the original MoE block's output on the compressed model's inputs,
``e_t = y_orig(x_t) - y(x_t)`` (shared experts cancel). ``both`` (the default): the two
objectives summed, ``||e_stream - F d||^2 + ||e_layer - F d||^2``, which is the least-squares fit
of their mean ``(e_stream + e_layer) / 2`` (plus a constant), solved with the same Gram matrix and
ridge. Measured on the testbed (docs/benchmarks.md, "Repair after removal"), mean of 3 seeds:
``stream`` alone helps qwen3moe at 16 and 8 of 32 most and costs mixtral 0.3-2%; ``both`` keeps
most of the first and not the second. The original stream is computed by running the compressed
model's decoder layers with their original MoE blocks swapped back in (``OriginalStream``): one
more pass of each layer, and a second set of hidden states. The router step keeps the ``layer``
target.

Router re-fit (our derivation; no paper does this). The pruned layer's routed output is
``y'(x) = sum_{j in K(x)} w_j(z) f_j(x)`` with logits ``z = W_S x`` over the kept experts ``S``,
``K(x)`` the selected top-k and ``f_j`` the (unweighted) expert outputs. The target is the
*original* layer's output ``y(x)`` (shared experts, identical in both, cancel in ``r = y - y'``).
Holding the selection ``K(x)`` fixed, one Gauss-Newton step on

    min_dW  sum_t || r_t - sum_m g_tm (dW_m . x_t) ||^2 + lam ||dW||^2,
    g_tm = d y'_t / d z_m = sum_{j in K} (d w_j / d z_m) f_j(x_t)

is linear least squares in all kept rows at once (``|S| * H`` unknowns), solved exactly from
its normal equations ``(A + lam I) vec(dW) = b`` with
``A[(m, a), (n, b)] = sum_t (g_tm . g_tn) x_ta x_tb`` and ``b[(m, a)] = sum_t (g_tm . r_t) x_ta``.
The routing-weight derivatives are closed form: with scores ``s = softmax(z)`` (or
``sigmoid(z)``) and a constant ``c`` (routed scaling factor), unnormalised top-k weights
``w_j = c s_j`` give ``dw_j/dz_m = c ds_j/dz_m``; normalised ones ``w_j = c s_j / N``,
``N = sum_{i in K} s_i``, give ``dw_j/dz_m = c (ds_j/dz_m / N - s_j sum_{i in K} ds_i/dz_m / N^2)``
(for softmax this is ``w_j (delta_jm - w_m / c)`` on ``K``). Which of the two a router computes is
read off its own routing (``w / s`` constant: unnormalised; ``sum_K w`` constant: normalised).
A softmax's shift invariance makes ``A`` singular (adding one vector to every row changes
nothing): the ridge ``lam = router_ridge * mean(diag A)`` picks the smallest step.

Token weighting: every calibration token counts once in both fits (squared error of the layer's
hidden-state output, no per-token weights); a token's residual is shared among its selected
experts in the per-expert down-projection step as documented in :mod:`moecompress.refit`
(the joint fit needs no sharing: the whole residual is its target).

Not re-fitted: shared experts and their gates, per-expert router biases, and (except by
``refit+tune``, which tunes every tensor of the routed experts and the router weight) the
gate/up projections.
The router fit is skipped (and the record says why) for families whose routing weight scales
the expert input (Llama-4), for routers whose weights are neither form above, and for layers
whose joint system exceeds ``ROUTER_MAX_UNKNOWNS`` (|S| * H; the accumulator is that squared).
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import nn

from .arch import MoELayer, Routing, moe_view
from .capture import LayerCursor
from .errors import MoECompressError
from .onload import is_streamed, onloaded, resident
from .options.groups import RepairOptions
from .refit import (JOINT_MAX_FEATURES, JointRefitObserver, RefitObserver, block_output, block_tokens,
                    block_working_bytes, routed_slots, solve_bytes)

REPAIR_MODES = ("none", "refit", "refit+router", "refit+tune")
ROUTER_CHANGING_MODES = ("refit+router", "refit+tune")  # they change the kept router rows: surgery writes them
# target -> weight of the stream residual (the rest: the layer's own residual)
REPAIR_TARGETS = {"both": 0.5, "stream": 1.0, "layer": 0.0}
DEFAULT_TARGET = RepairOptions.model_fields["repair_target"].default  # the option is the one source
# With calibration text. The router step is measured to add little for its cost (docs/benchmarks.md,
# "Repair after removal"): it is asked for with --repair refit+router.
DEFAULT_MODE = "refit"
JOINT_RIDGE = 1e-1  # joint down-projection fit (testbed, 16/32: 0.001, 0.01, 0.1, 0.3 measured; 0.1 best)
EXPERT_RIDGE = 1e-2  # per-expert (Jacobi) fit: the merge's default, measured there
DEFAULT_ROUTER_RIDGE = 1.0  # testbed, 16/32 with the joint fit: 0.01, 0.1, 1.0 measured; 1.0 best
REPAIR_SEQUENCES = 256  # calibration sequences the re-fit reads at least (docs/benchmarks.md: 64 -> 256 measured)
ROUTER_MAX_UNKNOWNS = 8192  # |S| * H: the joint normal equations are float32 [8192, 8192] = 256 MiB at most


def repair_tokens(tokenizer, source, *, n: int, seq_len: int, seed: int = 0, mode: str = "chunk",
                  field: str = "text", sequences: int | None = None) -> torch.Tensor:
    """The repair's calibration tokens: the selection's ``n`` sequences of ``source`` (the same
    seeded draw) continued to ``sequences`` (default ``REPAIR_SEQUENCES``; all the source has
    if fewer, never fewer than ``n``)."""
    return selection_and_repair_tokens(tokenizer, source, n=n, seq_len=seq_len, seed=seed, mode=mode, field=field,
                                       sequences=sequences)[1]


def selection_and_repair_tokens(tokenizer, source, *, n: int, seq_len: int, seed: int = 0, mode: str = "chunk",
                                field: str = "text", sequences: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection's ``n`` sequences (``load_calibration``) and the repair's (``repair_tokens``),
    from one reading and tokenisation of ``source``."""
    from .calibration import load_calibration_draws

    return load_calibration_draws(tokenizer, source, n=n, seq_len=seq_len, seed=seed, mode=mode, field=field,
                                  extend_to=REPAIR_SEQUENCES if sequences is None else sequences)


def check_mode(mode: str, target: str = DEFAULT_TARGET) -> None:
    if mode not in REPAIR_MODES:
        raise MoECompressError(f"unknown --repair '{mode}'; use one of: {', '.join(REPAIR_MODES)}")
    if target not in REPAIR_TARGETS:
        raise MoECompressError(f"unknown --repair-target '{target}'; use one of: {', '.join(REPAIR_TARGETS)}")


class OriginalStream:
    """The original model's hidden states after each decoder layer on the calibration tokens:
    ``model``'s decoder layers run with the original MoE blocks ``originals`` swapped back in
    (everything else is shared by the two models), a layer at a time (``capture.LayerCursor``)."""

    def __init__(self, model, view, originals: dict[int, nn.Module], tokens: torch.Tensor, *, batch_size: int,
                 until: int):
        self.cursor = LayerCursor(model, tokens, batch_size=batch_size, view=view, until=until)
        self.decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
        self.attr, self.originals = view.spec.moe_block, originals

    def after(self, layer_idx: int) -> list[torch.Tensor]:
        """Per batch, the original hidden states after decoder layer ``layer_idx`` (where the
        cursor stores them: ``capture._activation_store``)."""
        swapped = {i: getattr(self.decoder_layers[i], self.attr) for i in self.originals
                   if self.cursor.position <= i <= layer_idx}
        try:
            for i in swapped:
                setattr(self.decoder_layers[i], self.attr, self.originals[i])
            self.cursor.advance(layer_idx)
        finally:
            for i, block in swapped.items():
                setattr(self.decoder_layers[i], self.attr, block)
        return self.cursor.hidden


def routing_jacobian(routing: Routing, scoring: str, form: tuple[str, float]) -> torch.Tensor:
    """[T, k, S] derivatives of the selected routing weights w_j (j in top-k) with respect to
    the logits z_m of every kept expert, selection held fixed (module docstring)."""
    s = routing.probs.float()  # [T, S]
    idx = routing.topk_idx
    s_k = s.gather(1, idx)  # [T, k]
    onehot = torch.zeros(*idx.shape, s.shape[1], dtype=s.dtype, device=s.device).scatter_(2, idx[..., None], 1.0)
    if scoring == "sigmoid":
        ds = onehot * (s_k * (1 - s_k))[..., None]  # ds_j/dz_m = delta_jm s_j (1 - s_j)
    else:
        ds = s_k[..., None] * (onehot - s[:, None, :])  # s_j (delta_jm - s_m)
    kind, c = form
    if kind == "plain":
        return c * ds
    n = s_k.sum(1)[:, None, None]
    jac = c * (ds / n - s_k[..., None] * ds.sum(1, keepdim=True) / n**2)
    # exactly 0 for unselected m (the normalisation cancels them): zeroed, not left at rounding noise
    return jac * onehot.amax(1, keepdim=True)


def weight_form(routing: Routing, tol: float = 1e-3) -> tuple[str, float] | None:
    """("plain", c) when w = c * s, ("normalised", c) when w = c * s / sum_K s, else None."""
    s_k = routing.probs.float().gather(1, routing.topk_idx)
    w = routing.topk_weight.float()
    if routing.topk_idx.shape[1] > 1 or w.numel() == 0:  # k = 1 normalised weights are constant: checked second
        ratio = w / s_k.clamp_min(1e-30)
        if float(ratio.std(unbiased=False)) <= tol * float(ratio.abs().mean()):
            return "plain", float(ratio.mean())
    total = w.sum(1)
    if float(total.std(unbiased=False)) <= tol * float(total.abs().mean()):
        return "normalised", float(total.mean())
    return None


class RouterObserver:
    """Accumulates the Gauss-Newton normal equations of one layer's kept router rows."""

    def __init__(self, layer_idx: int, original: nn.Module, sliced: bool = True):
        self.layer_idx, self.original = layer_idx, original
        self.sliced = sliced  # the original block on block_tokens at a time (refit.RefitObserver)
        self.A: torch.Tensor | None = None  # [S, H, S, H]
        self.b: torch.Tensor | None = None  # [S, H]
        self.skip: str | None = None
        self.form: tuple[str, float] | None = None
        self.err = self.ref = 0.0

    def onload_with(self, layer: MoELayer) -> list[nn.Module]:
        return [self.original] if layer.layer_idx == self.layer_idx else []

    @torch.no_grad()
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        if layer.layer_idx != self.layer_idx or self.skip:
            return
        S, H = layer.num_experts, layer.hidden_size
        if self.A is None:
            if layer.spec.weight_on_input:
                self.skip = "the routing weight scales the expert input (not modelled)"
            elif S * H > ROUTER_MAX_UNKNOWNS:
                self.skip = f"{S} x {H} router unknowns exceed the joint solve's {ROUTER_MAX_UNKNOWNS}"
            else:
                self.form = weight_form(routing)
                if self.form is None:
                    self.skip = "routing weights are neither c*s nor c*s/sum(s) over the top-k"
            if self.skip:
                return
            self.A = torch.zeros(S, H, S, H, dtype=torch.float32, device=x.device)
            self.b = torch.zeros(S, H, dtype=torch.float32, device=x.device)
        resid = (block_output(self.original, x, block_tokens(layer) if self.sliced else None) - y).float()
        shared = layer.shared_forward(x)
        routed = y.float() - (shared.float() if shared is not None else 0.0)
        self.err += float(resid.double().square().sum())
        self.ref += float((routed + resid).double().square().sum())
        T, k = routing.topk_idx.shape
        feats = torch.zeros(T, k, H, dtype=torch.float32, device=x.device)  # f_j(x_t), unweighted
        for e, tok, pos in routed_slots(routing.topk_idx, layer.num_experts):
            feats[tok, pos] = layer.expert_forward(e, x[tok]).float()
        jac = routing_jacobian(routing, layer.spec.scoring, self.form)  # [T, k, S]
        g = torch.einsum("tjm,tjh->tmh", jac, feats)  # [T, S, H] d y' / d z_m
        xf = x.float()
        self.b += torch.einsum("tm,ta->ma", torch.einsum("tmh,th->tm", g, resid), xf)
        p = torch.bmm(g, g.transpose(1, 2))  # [T, S, S]
        for m in range(S):
            for n in range(m, S):
                w = p[:, m, n]
                nz = w.nonzero().flatten()
                if nz.numel():
                    xs = xf[nz]
                    self.A[m, :, n, :] += (xs * w[nz, None]).T @ xs

    @torch.no_grad()
    def apply(self, layer: MoELayer, ridge: float) -> dict:
        if self.skip or self.A is None:
            return {"router": "skipped: " + (self.skip or "no calibration tokens")}
        S, H = self.b.shape
        a = self.A.double()
        upper = torch.triu(torch.ones(S, S, dtype=torch.bool, device=a.device), 1)
        a = a + (a * upper[:, None, :, None]).permute(2, 3, 0, 1)  # fill the lower blocks (symmetric)
        a = a.reshape(S * H, S * H)
        lam = ridge * float(a.diagonal().mean()) + 1e-12
        delta = torch.linalg.solve(a + lam * torch.eye(S * H, dtype=a.dtype, device=a.device),
                                   self.b.double().reshape(-1)).reshape(S, H)
        w = layer.router_weight
        w.data.copy_((w.data.double() + delta.to(w.device)).to(w.dtype))
        self.A = self.b = None
        return {"router": "gauss-newton", "router_form": self.form[0]}

    def relative_error(self) -> float | None:
        return self.err / self.ref if self.ref else None


def _original_blocks(model, original) -> dict[int, nn.Module]:
    if isinstance(original, dict):
        return original
    return {layer.layer_idx: layer.block for layer in moe_view(original)}


@torch.no_grad()
def repair(model, original, tokens: torch.Tensor, *, mode: str = DEFAULT_MODE, ridge: float | None = None,
           router_ridge: float | None = None, batch_size: int = 8, progress: bool = True,
           joint: bool = True, target: str = DEFAULT_TARGET, tune_epochs: int | None = None,
           tune_lr: float | None = None, seed: int = 0, on_layer_done=None, blocks=None) -> dict:
    """Re-fit ``model``'s (compressed) MoE layers, in place, so each reproduces the original
    layer on the calibration ``tokens`` [n, seq_len]; ``original`` is the uncompressed model or
    its MoE blocks ``{layer_idx: block}`` (only the MoE blocks are read). Returns the record
    for ``moecompress.json``: what was re-fitted per layer, and each layer's relative routed
    output error before the repair. ``mode="none"`` does nothing. ``ridge`` defaults to
    ``JOINT_RIDGE`` where the down projections are fitted jointly, ``EXPERT_RIDGE`` per expert.
    ``mode="refit+tune"`` then tunes each layer (:mod:`moecompress.blocktune`: ``tune_epochs``,
    ``tune_lr``; ``seed`` orders its tokens). ``on_layer_done(layer)`` is called when a layer's
    weights are final, while they are onloaded (a surgery running beside: ``surgery.SurgeryAlongside``).
    ``blocks`` (``merge.blocks.DeferredBlocks``): the compressed blocks are built as their layer's
    turn comes (``build``) and handed back when final (``done``)."""
    run = LayerRepair(model, original, tokens, mode=mode, ridge=ridge, router_ridge=router_ridge,
                      batch_size=batch_size, progress=progress, joint=joint, target=target, tune_epochs=tune_epochs,
                      tune_lr=tune_lr, seed=seed, on_layer_done=on_layer_done, blocks=blocks)
    for li in run.layer_indices:
        run.step(li)
    return run.record


class LayerRepair:
    """:func:`repair` a layer at a time: ``step(li)`` for each MoE layer in order (it may be
    called as soon as layer li is compressed, e.g. while later layers are still being chosen:
    ``PruneRepair``); ``record`` is the record so far."""

    @torch.no_grad()
    def __init__(self, model, original, tokens: torch.Tensor, *, mode: str = DEFAULT_MODE,
                 ridge: float | None = None, router_ridge: float | None = None, batch_size: int = 8,
                 progress: bool = True, joint: bool = True, target: str = DEFAULT_TARGET,
                 tune_epochs: int | None = None, tune_lr: float | None = None, seed: int = 0, on_layer_done=None,
                 blocks=None):
        from .blocktune import DEFAULT_EPOCHS, DEFAULT_LR

        check_mode(mode, target)
        self.mode, self.ridge, self.joint, self.target, self.seed = mode, ridge, joint, target, seed
        self.router_ridge = DEFAULT_ROUTER_RIDGE if router_ridge is None else router_ridge
        self.tune_epochs = DEFAULT_EPOCHS if tune_epochs is None else tune_epochs
        self.tune_lr = DEFAULT_LR if tune_lr is None else tune_lr
        self.progress, self.on_layer_done, self.blocks = progress, on_layer_done, blocks
        self.record = {"mode": mode, "ridge": ridge,
                       "router_ridge": self.router_ridge if mode == "refit+router" else None,
                       "target": {"both": "original residual stream and layer output, equally",
                                  "stream": "original residual stream", "layer": "original layer output"}[target],
                       "token_weighting": "uniform", "calibration_sequences": int(tokens.shape[0]), "layers": {}}
        if mode == "refit+tune":
            self.record["tune"] = {"method": "block-wise tuning (EBFT), Adam", "epochs": self.tune_epochs,
                                   "lr": self.tune_lr, "seed": seed}
        self.layer_indices: list[int] = []
        if mode == "none":
            return
        self.originals = _original_blocks(model, original)
        self.view = moe_view(model)
        self.layers = {layer.layer_idx: layer for layer in self.view if layer.layer_idx in self.originals}
        self.layer_indices = sorted(self.layers)
        if not self.layers:
            return
        self.streamed = is_streamed(model)  # the original block in slices of the batch under a GPU cap only
        last = self.layer_indices[-1]
        self.cursor = LayerCursor(model, tokens, batch_size=batch_size, view=self.view, until=last)
        self.stream = (OriginalStream(model, self.view, self.originals, tokens, batch_size=batch_size, until=last)
                       if REPAIR_TARGETS[target] > 0 else None)

    @torch.no_grad()
    def step(self, li: int) -> None:
        """Re-fit layer ``li`` (the layers before it are done); the cursors move past it.
        Per layer: observe for the router fit, re-fit the router; observe again (new routing)
        for the down projections, re-fit them; run the layer once more for the next layer's inputs."""
        from .blocktune import TunePairs, trainable_parameters, tune_layer
        from .merge.offload import write_back  # merge imports this package's refit: imported here

        layer, originals, cursor, blocks = self.layers[li], self.originals, self.cursor, self.blocks
        mode, progress, tune = self.mode, self.progress, self.mode == "refit+tune"
        entry = {}
        with contextlib.ExitStack() as hold:  # closed early below; on an error, on leaving
            # streamed, the original goes to the GPU once for its stream pass, a deferred block's build
            # and the observed pass (three onloads before); in memory this holds nothing
            hold.enter_context(resident(originals[li]))
            # the original stream first: it runs the original block, so a deferred block is built after it
            targets = {li: self.stream.after(li)} if self.stream is not None else None
            if blocks is not None:
                built = blocks.build(li)
                if built is not None:  # swapped into the model: this view (and the cursors') take it
                    layer.block = built
            if mode == "refit+router":
                start = cursor.state()
                router_obs = RouterObserver(li, originals[li], sliced=self.streamed)
                cursor.advance(li, [router_obs], progress=progress, description=f"repair: router of layer {li}")
                with onloaded(layer.block):
                    entry = router_obs.apply(layer, self.router_ridge)
                    write_back(layer.block, [layer.router_weight])
                if router_obs.relative_error() is not None:
                    entry["relative_error"] = router_obs.relative_error()
                cursor.restore(start)
            fit_jointly = self.joint and layer.num_experts * layer.intermediate_size <= JOINT_MAX_FEATURES
            pairs = TunePairs(cursor.store) if tune else None
            down = (JointRefitObserver if fit_jointly else RefitObserver)({li: originals[li]}, targets,
                                                                            REPAIR_TARGETS[self.target], pairs,
                                                                            sliced=self.streamed)
            with cursor.editing(li, [down], progress=progress, description=f"repair: down projections of layer {li}"):
                hold.close()  # observed: the original is not needed for the solve and the edited pass
                with onloaded(layer.block):
                    lam = self.ridge if self.ridge is not None else (JOINT_RIDGE if fit_jointly else EXPERT_RIDGE)
                    down.apply(layer, lam)
                    edits = [layer.down_proj]
                    if tune:
                        entry["tune"] = tune_layer(layer, pairs, epochs=self.tune_epochs, lr=self.tune_lr,
                                                   seed=self.seed + li, device=cursor.device, progress=progress)
                        edits += list(trainable_parameters(layer).values())
                    write_back(layer.block, edits)
                    if self.on_layer_done is not None:
                        self.on_layer_done(layer)
                entry["relative_error_after_router" if "relative_error" in entry else "relative_error"] = \
                    down.relative_error(li)
                entry["refit"] = "down_proj, joint" if fit_jointly else "down_proj, per expert"
                entry["ridge"] = lam
            if blocks is not None:
                blocks.done(li)
        self.record["layers"][li] = entry


def working_bytes(view, keep: int, mode: str) -> int:
    """Bytes the repair holds on the execution device at once (one layer): its float32
    accumulators and the float64 solve (``refit.ridge_solve``: the system, its Cholesky factor
    and inverse, the right-hand sides and their product), of all kept experts at once where they
    are fitted jointly, of one expert at a time where they are fitted per expert."""
    if mode == "none":
        return 0
    layer = view.layers[0]
    inter, hidden = layer.intermediate_size, layer.hidden_size
    joint = keep * inter <= JOINT_MAX_FEATURES
    n = keep * inter if joint else inter  # unknowns per solve
    down = 4 * ((keep * inter) ** 2 + keep * inter * hidden if joint else keep * inter * (inter + hidden))
    down += solve_bytes(n, hidden)
    if not joint:  # observed in blocks of experts
        down += block_working_bytes(hidden, inter)
    router = 4 * (keep * hidden) ** 2 if mode == "refit+router" and keep * hidden <= ROUTER_MAX_UNKNOWNS else 0
    tune = 0
    if mode == "refit+tune":  # after the solve, its accumulators still held: a float32 copy of the
        # kept block with its gradients and Adam's two moments, and one step's activations
        from .blocktune import BATCH_TOKENS

        tune = down + 16 * keep * (3 * inter * hidden + hidden) + 4 * BATCH_TOKENS * (layer.top_k * 4 * inter + 4 * hidden)
    return max(down, router * 3, tune)  # the router's joint system: float64 copies while solving


@torch.no_grad()
def prune_and_repair(model, kept: dict[int, list[int]], tokens: torch.Tensor, *, mode: str = DEFAULT_MODE,
                     ridge: float | None = None, router_ridge: float | None = None, batch_size: int = 8,
                     progress: bool = True, offload_folder=None, target: str = DEFAULT_TARGET,
                     tune_epochs: int | None = None, tune_lr: float | None = None, seed: int = 0,
                     on_layer_done=None, keep_model: bool = True) -> dict:
    """Keep ``kept[layer_idx]`` experts of every MoE layer of ``model`` (in place) and repair
    the pruned layers against the original blocks (:class:`PruneRepair`, all layers chosen
    already). Returns the record."""
    run = PruneRepair(model, len(next(iter(kept.values()))), tokens, mode=mode, ridge=ridge,
                      router_ridge=router_ridge, batch_size=batch_size, progress=progress,
                      offload_folder=offload_folder, target=target, tune_epochs=tune_epochs, tune_lr=tune_lr,
                      seed=seed, on_layer_done=on_layer_done, keep_model=keep_model,
                      grouped=moe_view(model).stays_grouped(kept))
    return run.finish(kept)


class PruneRepair:
    """Prune and repair a layer at a time, as the kept experts of each layer become known:
    ``chosen(li, kept)`` (a selection's ``on_layer``, in layer order) builds layer li's pruned
    block and re-fits it at once, while later layers are still being chosen (their original
    blocks and the config stay as they are until :meth:`finish`); ``finish(kept)`` prunes and
    repairs the layers not given yet, makes the config follow, and returns the record.

    The pruned blocks are built by the merge's block builder (a cluster of one expert is that
    expert), one layer at a time (``merge.blocks.defer_blocks``). A streamed model stays
    streamed: each pruned block is used from the GPU, then written to ``offload_folder``, or
    with ``keep_model=False`` (the caller does not run the model afterwards: the shard surgery
    writes the output) dropped; in memory, ``keep_model=False`` drops it too, once final
    (``on_layer_done`` has it). ``grouped``: whether the kept experts keep grouped routing
    (``MoEModel.balanced_groups(keep) > 1`` for a selection that keeps a quota per group).

    Why a layer at a time: a streamed model's decoder layer then goes to the GPU once for its
    selection and its re-fit, instead of once more for the re-fit (``prune.checkpoint.
    refit_schedule``, which applies it to streamed models only: in GPU memory the two orders
    measured the same, docs/benchmarks.md "Session 18"). The values are those of choosing every
    layer first: the selection and the re-fit run on their own activations
    (``capture.LayerCursor``), and the re-fit of a layer reads only its kept set.
    """

    def __init__(self, model, keep: int, tokens: torch.Tensor, *, mode: str = DEFAULT_MODE,
                 ridge: float | None = None, router_ridge: float | None = None, batch_size: int = 8,
                 progress: bool = True, offload_folder=None, target: str = DEFAULT_TARGET,
                 tune_epochs: int | None = None, tune_lr: float | None = None, seed: int = 0,
                 on_layer_done=None, keep_model: bool = True, grouped: bool = False):
        from .merge.api import METHODS, MergePlan
        from .merge.blocks import defer_blocks

        view = moe_view(model)
        self.plan = MergePlan(clusters={}, dominant={},
                              frequency={layer.layer_idx: torch.zeros(layer.num_experts) for layer in view})
        self.keep = keep
        self.originals, self.blocks = defer_blocks(model, self.plan, METHODS["average"], "dominant", offload_folder,
                                                   keep=keep_model, grouped=grouped)
        self.refit = LayerRepair(model, self.originals, tokens, mode=mode, ridge=ridge, router_ridge=router_ridge,
                                 batch_size=batch_size, progress=progress, target=target, tune_epochs=tune_epochs,
                                 tune_lr=tune_lr, seed=seed, on_layer_done=on_layer_done, blocks=self.blocks)
        self.done: list[int] = []

    @property
    def progress(self) -> bool:
        """Whether the re-fit's passes show their own progress bars."""
        return self.refit.progress

    @progress.setter
    def progress(self, on: bool) -> None:
        self.refit.progress = on

    def chosen(self, layer_idx: int, kept: list[int]) -> None:
        if len(kept) != self.keep or (self.done and layer_idx <= self.done[-1]):
            raise ValueError(f"layer {layer_idx}: {len(kept)} kept experts, after layers {self.done}")
        self.plan.clusters[layer_idx] = [[e] for e in kept]
        self.plan.dominant[layer_idx] = list(kept)
        if layer_idx in self.refit.layer_indices:  # else (--repair none) finish() builds it
            self.refit.step(layer_idx)
        self.done.append(layer_idx)

    def finish(self, kept: dict[int, list[int]]) -> dict:
        for li in sorted(kept):
            if li not in self.done:
                self.chosen(li, kept[li])
            elif self.plan.dominant[li] != list(kept[li]):
                raise ValueError(f"layer {li} was re-fitted for other kept experts")
        self.blocks.finish()  # layers the repair did not reach (--repair none); the config follows
        return self.refit.record
