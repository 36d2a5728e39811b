"""Unstructured and N:M pruning of the routed experts' weights: MoE-Pruner, Wanda, magnitude.

* ``moe-pruner`` — Xie et al., "MoE-Pruner: Pruning Mixture-of-Experts Large Language Model
  using the Hints from Its Router" (2024, arXiv:2410.12013), Eq. 9 of its method section::

      S_ij = |W_ij| * || X_j * Gate ||_2

  for expert e: ``X`` holds the inputs of the matrix over the calibration tokens and ``Gate`` each
  token's router weight for e (0 where e is not selected, so only tokens routed to e count), i.e.
  ``||X_j * Gate||^2 = sum_t (w_{t,e} x_{t,j})^2``.
* ``wanda`` — Sun et al., "A Simple and Effective Pruning Approach for Large Language Models"
  (2023): ``S_ij = |W_ij| * ||X_j||_2`` with the same per-expert tokens, without the router weight.
* ``magnitude`` — ``S_ij = |W_ij|``.

Where the paper is followed (audited against its text; tests check Eq. 9 with Eq. 2 by brute force):

* Gate is the paper's Eq. 2, ``Softmax(TopK(x W_g))``: the top-k router weights renormalised over
  the selected experts ("the normalized router weight of each selected expert", Fig. 1), not the
  full-softmax probability. We take the weight the model itself multiplies the expert's output
  by (Eq. 1), which *is* Eq. 2 for Mixtral and Qwen3-MoE with ``norm_topk_prob`` (the testbed).
* Every expert matrix (gate, up, down) is pruned; the input of gate/up is the token's hidden
  state, the input of down the expert's intermediate activation ``act(gate x) * (up x)`` on those
  tokens. Shared experts, attention and routers are untouched.
* Comparison group: each output neuron (a row of ``W`` in ``nn.Linear`` convention), as in
  Wanda; N:M compares within every M consecutive inputs of a row. One-shot, no weight update.
* Calibration: the paper uses 128 sequences of pretraining text (C4), the same sequences for
  every method; here the caller's tokens (CLI default 64 x 512 of the given file).

Where the paper is silent or ambiguous, our reading:

* Sequential layers: the paper says its pruning "is implemented in a layer-wise reconstruction
  manner", like SparseGPT and Wanda, whose reference code re-runs each layer after pruning it so
  the next layer sees pruned inputs. We do that (``sequential=True``; each layer's statistics are
  gathered with the earlier layers already pruned, and within a layer gate, up and down all use
  the statistics of the layer before it is pruned). Algorithm 1 as printed passes on the output
  computed *before* pruning, i.e. dense statistics: ``sequential=False``.
* Families whose router weight is not renormalised (DeepSeek-V2, Qwen3-MoE without
  ``norm_topk_prob``, sigmoid routers): Gate is the weight the model applies to the expert output.
  Llama-4 scales the expert *input* instead: ``X`` is then the scaled input the matrix reads and
  Gate multiplies it once more (the paper only treats Mixtral).
* An expert no calibration token reached has no activation statistics: its weights are ranked by
  magnitude rather than by index. ``round(sparsity * in)`` weights go per row (Wanda's code
  truncates; equal at 50%).

Pruned weights are written as zeros in dense storage (the checkpoint keeps its size; sparse
kernels, e.g. 2:4 on recent GPUs, are what turn them into speed or memory). ``nm=(N, M)`` keeps
the N highest-scoring weights in every group of M consecutive inputs of a row (2:4 -> 50%).
"""

from __future__ import annotations

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..arch import MoELayer, moe_view
from ..capture import LayerCursor, run_calibration
from ..errors import MoECompressError
from ..merge.offload import layer_editor
from ._routing import routed_tokens

METHODS = ("moe-pruner", "wanda", "magnitude")
MATRICES = ("gate_proj", "up_proj", "down_proj")


class InputNorms:
    """Observer: per expert, sum over routed tokens of squared inputs of gate/up ([E, H]) and
    down ([E, I]), optionally weighted by the routing weight (MoE-Pruner's ``X * Gate``)."""

    def __init__(self, layer_indices, router_weighted: bool):
        self.layer_indices = set(layer_indices)
        self.router_weighted = router_weighted
        self.sq_in: dict[int, torch.Tensor] = {}
        self.sq_hidden: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}

    def observe(self, layer: MoELayer, x, routing, y) -> None:
        i = layer.layer_idx
        if i in self.layer_indices:
            if i not in self.sq_in:
                E, dev = layer.num_experts, x.device
                self.sq_in[i] = torch.zeros(E, layer.hidden_size, device=dev)
                self.sq_hidden[i] = torch.zeros(E, layer.intermediate_size, device=dev)
                self.tokens[i] = torch.zeros(E, device=dev)
            for et in routed_tokens(layer, x, routing):
                xin = et.x_in.float()
                h = layer.expert_hidden(et.e, et.x_in).float()
                if self.router_weighted:
                    xin, h = xin * et.weight[:, None], h * et.weight[:, None]
                self.sq_in[i][et.e] += xin.square().sum(0)
                self.sq_hidden[i][et.e] += h.square().sum(0)
                self.tokens[i][et.e] += et.tok.numel()


def weight_scores(layer: MoELayer, method: str, norms: InputNorms | None) -> dict[str, torch.Tensor]:
    """Pruning score of every routed-expert weight: ``{matrix name: [E, out, in]}`` (float32)."""
    return {name: torch.stack([expert_scores(layer, name, e, method, norms) for e in range(layer.num_experts)])
            for name in MATRICES}


def expert_scores(layer: MoELayer, name: str, e: int, method: str, norms: InputNorms | None) -> torch.Tensor:
    """Pruning score of the weights of matrix ``name`` of expert ``e``: [out, in] (float32)."""
    w = getattr(layer, name)[e].detach().float().abs()
    if method == "magnitude":
        return w
    # An expert no calibration token reached has no activation statistics at all: rank its
    # weights by magnitude rather than by index.
    if int(norms.tokens[layer.layer_idx][e]) == 0:
        return w
    sq = (norms.sq_hidden if name == "down_proj" else norms.sq_in)[layer.layer_idx][e]
    return w * sq.sqrt().to(w.device)[None, :]


def prune_mask(score: torch.Tensor, sparsity: float | None = None, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean mask (True = prune) for ``score`` [..., out, in], comparing within each row.

    Unstructured: the ``round(sparsity * in)`` lowest scores of every row. N:M: in every group of
    M consecutive inputs of a row, the M - N lowest. Ties go to the lower index being kept.
    """
    *lead, rows, cols = score.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise MoECompressError(f"N:M pruning needs the input size ({cols}) to be a multiple of M={m}")
        groups = score.reshape(*lead, rows, cols // m, m)
        order = torch.sort(groups, dim=-1, stable=True).indices  # ascending: the first m-n go
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., : m - n], True)
        return mask.reshape(score.shape)
    k = int(round(sparsity * cols))
    order = torch.sort(score, dim=-1, stable=True).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order[..., :k], True)


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4)."""
    if text is None:
        return None
    try:
        n, m = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise MoECompressError(f"--nm must look like N:M (e.g. 2:4), got '{text}'") from None
    if not 0 < n < m:
        raise MoECompressError(f"--nm N:M needs 0 < N < M, got '{text}'")
    return n, m


def _check(method: str, sparsity: float | None, nm) -> None:
    if method not in METHODS:
        raise MoECompressError(f"unknown unstructured method '{method}'; use one of: {', '.join(METHODS)}")
    if (sparsity is None) == (nm is None):
        raise MoECompressError("give exactly one of --sparsity S (unstructured) or --nm N:M (semi-structured)")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise MoECompressError(f"--sparsity must be in [0, 1), got {sparsity}")


@torch.no_grad()
def _prune_layer(layer: MoELayer, method: str, norms: InputNorms | None, sparsity: float | None, nm,
                 counts: list[int]) -> dict[str, float]:
    """Prune one layer's expert matrices; returns each matrix's sparsity and adds its zeros and
    size to ``counts``. One expert matrix at a time: its scores, their sort and the mask are
    what the layer needs besides its weights (a streamed layer's GPU working set); the rows
    are compared within themselves, so the masks equal those of the whole layer at once."""
    out = {}
    for name in MATRICES:
        w = getattr(layer, name)
        for e in range(layer.num_experts):
            w[e].masked_fill_(prune_mask(expert_scores(layer, name, e, method, norms), sparsity, nm).to(w.device), 0)
        zeros = int((w == 0).sum())
        out[name] = zeros / w.numel()
        counts[0] += zeros
        counts[1] += w.numel()
    return out


def unstructured_prune(model, tokens: torch.Tensor | None, sparsity: float | None = None, method: str = "moe-pruner",
                       nm: tuple[int, int] | str | None = None, *, batch_size: int = 8, sequential: bool = True,
                       progress: bool = True, offload_folder=None) -> dict:
    """Prune the routed experts' weights of ``model`` in place with ``method``; returns a report.

    ``sparsity`` (fraction of each row, hence of each matrix) or ``nm`` (N:M pattern); ``tokens``
    [N, S] are the calibration tokens (unused for ``magnitude``). A streamed model
    (``load_model(max_gpu_memory=...)``) is pruned one layer at a time, each onloaded once, its
    edited weights kept on disk in ``offload_folder`` (``merge.offload.edited``); the result
    equals the in-memory run's.
    """
    nm = parse_nm(nm) if isinstance(nm, str) else nm
    _check(method, sparsity, nm)
    view = moe_view(model)
    needs_data = method != "magnitude"
    if needs_data and tokens is None:
        raise MoECompressError(f"{method} needs calibration tokens (--calib)")
    per_layer = {}
    counts = [0, 0]  # zeros, weights of the routed experts' matrices
    edit = layer_editor(model, offload_folder)
    norms = None
    if needs_data and not sequential:
        norms = InputNorms(view.moe_layer_indices, router_weighted=method == "moe-pruner")
        run_calibration(model, tokens, [norms], batch_size=batch_size, view=view, progress=progress,
                        description=f"{method} statistics")
    # Sequential: the activations are carried from layer to layer (each layer runs once to be
    # observed and once more, pruned, for the next), not a pass from the embeddings per layer.
    cursor = LayerCursor(model, tokens, batch_size=batch_size, view=view) if needs_data and sequential else None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{method} pruning", total=len(view))
        for layer in view:
            if cursor is not None:
                norms = InputNorms([layer.layer_idx], router_weighted=method == "moe-pruner")
                with cursor.editing(layer.layer_idx, [norms]), edit(layer):
                    per_layer[layer.layer_idx] = _prune_layer(layer, method, norms, sparsity, nm, counts)
            else:
                with edit(layer):
                    per_layer[layer.layer_idx] = _prune_layer(layer, method, norms, sparsity, nm, counts)
            bar.advance(task)
    return {"method": method, "sparsity": sparsity, "nm": f"{nm[0]}:{nm[1]}" if nm else None,
            "storage": "dense-with-zeros", "sequential": sequential,
            "expert_weight_sparsity": counts[0] / counts[1], "per_layer": per_layer}
