"""Block-wise tuning of the kept experts after the closed-form repair (``--repair refit+tune``).

EBFT (Guo et al., "EBFT: Effective and Block-Wise Fine-Tuning for Sparse LLMs", 2024,
arXiv:2402.12419) fine-tunes a pruned model one block at a time by backpropagation: each block's
remaining weights minimise the block's reconstruction error against the dense model on a small
calibration set, and the next block is tuned on the tuned blocks' outputs. Here the block is one
MoE layer, tuned after the closed-form down-projection fit of :mod:`moecompress.repair` (its
starting point), and the reconstruction target is that repair's (``--repair-target``): with the
MoE output ``y_t = f(x_t)`` added to the residual stream, the decoder layer's output is
``h_t = r_t + y_t``, so the weighted sum of the two repair objectives

    w ||h_orig,t - (r_t + f(x_t))||^2 + (1 - w) ||y_orig(x_t) - f(x_t)||^2

equals, up to a constant, ``||y*_t - f(x_t)||^2`` with the per-token target

    y*_t = w (y_t + h_orig,t - h_t) + (1 - w) y_orig(x_t) = y_t + e_t

(``y_t``, ``h_t``: the layer before tuning; ``r_t = h_t - y_t`` does not depend on the MoE
weights; ``e_t`` is the residual the closed-form fit targets). :class:`TunePairs` records
``(x_t, y*_t)`` in the pass that observes the layer for the closed-form fit; :func:`tune_layer` then minimises ``mean_t ||f(x_t) - y*_t||^2`` over the routed
experts' weights (all of their fused tensors: gate, up, down and biases) and the router weight,
with Adam on a float32 copy of the block, in epochs over the tokens shuffled by a seeded
generator, and copies the result back. Shared experts, their gate and router biases stay as
they are (issue 19: left alone unless measured to help).

Held out (our addition, so that a learning rate tuned on one model cannot make another worse
than the closed form): the last eighth of the calibration batches is not trained on; after every
epoch the loss on it is measured, and the epoch with the least held-out loss is kept, epoch 0
being the closed-form fit itself. The record lists both losses per epoch and the kept epoch.

Measured on the testbed (docs/benchmarks.md, "Repair after removal"; mean of calibration seeds
0-2, docs / code / quotes): qwen3moe 16 of 32, the closed form 14.82 / 9.91 / 61.97, tuned 1, 2, 4
(default) and 8 epochs at lr 1e-3: 13.98 / 9.27, 13.84 / 9.13, 13.74 / 9.05 / 59.82, 13.68 / 8.98;
4 epochs at lr 3e-4: 13.87 / 9.18. Mixtral 2 of 8: the closed form 34.61 / 25.07 / 145.67, tuned
17.91 / 11.54 / 71.94. The cost is the epochs' forward and backward passes of the kept experts
over the calibration tokens: on the OLMoE-1B-7B shape (H200, 256 x 512 tokens) 4 s per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import MoELayer
from .capture import _bar, moved
from .onload import detached_copy
from .options.groups import RepairOptions
from .refit import block_output

# The option's defaults are the library's (one source of truth). Learning rate: testbed,
# qwen3moe 16 of 32: 1e-4, 3e-4 and 1e-3 measured, 1e-3 best (module docstring).
DEFAULT_EPOCHS = RepairOptions.model_fields["tune_epochs"].default
DEFAULT_LR = RepairOptions.model_fields["tune_lr"].default
BATCH_TOKENS = 4096  # tokens per Adam step
HELDOUT_SHARE = 8  # one batch in eight (the last ones) is held out, when there are at least two


class TunePairs:
    """Per batch of one MoE layer, the block inputs ``x`` and the tuning targets ``y*``, in float32
    on ``store``. Filled by the closed-form fit's observer (``refit.RefitObserver(pairs=...)``) in
    its own pass: ``y* = y + e`` with ``e`` the residual that fit targets (module docstring), so
    neither the original block nor the residual is computed a second time."""

    def __init__(self, store: torch.device):
        self.store = store
        self.x: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor) -> None:
        # pinned and asynchronous from a GPU (capture.moved): complete when the cursor's pass ends
        self.x.append(moved(x.float(), self.store))
        self.target.append(moved(y.float() + e, self.store))


def trainable_parameters(layer: MoELayer) -> dict[str, nn.Parameter]:
    """The tuned tensors of a layer, by name in its block: the fused experts' and the router weight."""
    names = {id(p): n for n, p in layer.block.named_parameters()}
    chosen = [*layer.expert_parameters().values(), layer.router_weight]
    return {names[id(p)]: p for p in chosen}


def _loss(block: nn.Module, xs: list[torch.Tensor], ts: list[torch.Tensor], device) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for x, t in zip(xs, ts):
            err = block_output(block, x.to(device)) - t.to(device)
            total += float(err.double().square().sum())
            count += err.numel()
    return total / max(count, 1)


def tune_layer(layer: MoELayer, pairs: TunePairs, *, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
               seed: int = 0, device: torch.device | None = None, batch_tokens: int = BATCH_TOKENS,
               autocast: torch.dtype | None = None, progress: bool = False) -> dict:
    """Tune ``layer``'s routed experts and router weight (in place; the block must be onloaded)
    on ``pairs`` (consumed: their training batches are released); returns the record (losses
    per epoch, the kept epoch). ``autocast`` (a dtype) is for benchmarks (bench/tune_speed.py)."""
    device = device or layer.router_weight.device
    batches = len(pairs.x)
    held = max(1, batches // HELDOUT_SHARE) if batches >= 2 else 0
    val_x, val_t = pairs.x[batches - held:], pairs.target[batches - held:]
    x_all, t_all = torch.cat(pairs.x[: batches - held]), torch.cat(pairs.target[: batches - held])
    # the pairs are used once: drop the per-batch copies of what was concatenated (peak memory)
    pairs.x, pairs.target = list(val_x), list(val_t)
    scored = (val_x, val_t) if held else ([x_all], [t_all])  # what picks the kept epoch

    block = detached_copy(layer.block).to(device=device, dtype=torch.float32)
    tuned = trainable_parameters(MoELayer(layer.model, layer.spec, layer.layer_idx, block))
    trained = {id(p) for p in tuned.values()}
    for p in block.parameters():
        p.requires_grad_(id(p) in trained)
    opt = torch.optim.Adam(list(tuned.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    record = {"epochs": epochs, "lr": lr, "batch_tokens": batch_tokens, "train_tokens": int(x_all.shape[0]),
              "heldout_tokens": int(sum(x.shape[0] for x in val_x)), "train_loss": [], "heldout_loss": []}
    best_loss, best_epoch, best = _loss(block, *scored, device), 0, None
    record["heldout_loss" if held else "train_loss"].append(best_loss)
    steps_per_epoch = -(-x_all.shape[0] // batch_tokens)
    with _bar(progress) as bar:
        task = bar.add_task(f"repair: tuning layer {layer.layer_idx}", total=epochs * steps_per_epoch)
        for epoch in range(1, epochs + 1):
            order = torch.randperm(x_all.shape[0], generator=gen)
            total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
            for i in range(0, order.numel(), batch_tokens):
                idx = order[i:i + batch_tokens]
                xb, tb = x_all[idx].to(device), t_all[idx].to(device)
                with torch.enable_grad(), torch.autocast(torch.device(device).type, dtype=autocast,
                                                         enabled=autocast is not None):
                    loss = (block_output(block, xb).float() - tb).square().mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                total += loss.detach()
                bar.advance(task)
            current = _loss(block, *scored, device)
            if held:
                record["train_loss"].append(float(total) / steps_per_epoch)
                record["heldout_loss"].append(current)
            else:
                record["train_loss"].append(current)
            if current < best_loss:
                best_loss, best_epoch = current, epoch
                best = {n: p.detach().clone() for n, p in tuned.items()}
    record["kept_epoch"] = best_epoch
    if best is not None:
        params = dict(layer.block.named_parameters())
        with torch.no_grad():
            for name, value in best.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
    return record


def plot_tuning(record: dict, path) -> None:
    """``repair_tuning.png``: per layer, the held-out loss of each epoch relative to the closed
    form's (epoch 0), the kept epoch marked: where the tuning helped, and where it stopped."""
    from .plotting import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(6, 4))
    for li, entry in sorted(record.get("layers", {}).items(), key=lambda kv: int(kv[0])):
        tune = entry.get("tune") or {}
        losses = tune.get("heldout_loss") or tune.get("train_loss") or []
        if not losses or not losses[0]:
            continue
        rel = [v / losses[0] for v in losses]
        (line,) = ax.plot(range(len(rel)), rel, marker=".", lw=1, label=f"layer {li}")
        kept = tune.get("kept_epoch", 0)
        ax.plot([kept], [rel[kept]], marker="o", ms=8, mfc="none", color=line.get_color())
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch (0 = the closed-form re-fit)")
    ax.set_ylabel("held-out loss / closed form's")
    ax.set_title("repair: block-wise tuning (circles: kept epoch)")
    if len(record.get("layers", {})) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
