"""Run calibration tokens through a model and hand every MoE layer's traffic to observers.

This is the one place where stages see activations: statistics, pruning scores, merging and
quantization all register an observer and receive, per MoE layer and batch, the layer input
``x`` [T, H], the routing decided by the model's own router, and the block output ``y``.
Everything is batched (no Python loop per token).
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .arch import MoELayer, MoEModel, Routing, moe_view


class Observer(Protocol):
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        """Called once per MoE layer and batch, in layer order, under ``torch.no_grad``."""


def batches_of(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


def _decoder(model):
    # Run the base model, not the LM head: calibration never needs vocabulary logits.
    return getattr(model, model.base_model_prefix, model)


@torch.no_grad()
def run_calibration(
    model,
    tokens: torch.Tensor,
    observers: Iterable[Observer],
    *,
    batch_size: int = 8,
    view: MoEModel | None = None,
    progress: bool = True,
    description: str = "calibrating",
) -> MoEModel:
    """Forward ``tokens`` [N, S] in batches; every observer sees every MoE layer's traffic."""
    view = view or moe_view(model)
    observers = list(observers)
    device = next(model.parameters()).device
    routings: dict[int, Routing] = {}
    hooks = []
    for layer in view:
        def on_router(mod, inp, out, layer=layer):
            routings[layer.layer_idx] = layer.routing_from_router_output(out)

        def on_block(mod, inp, out, layer=layer):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            y = out[0] if isinstance(out, tuple) else out
            y = y.reshape(-1, y.shape[-1])
            routing = routings.pop(layer.layer_idx)
            for obs in observers:
                obs.observe(layer, x, routing, y)

        hooks.append(layer.router.register_forward_hook(on_router))
        hooks.append(layer.block.register_forward_hook(on_block))
    chunks = batches_of(tokens, batch_size)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task(description, total=len(chunks))
            for chunk in chunks:
                _decoder(model)(input_ids=chunk.to(device), use_cache=False)
                bar.advance(task)
    finally:
        for h in hooks:
            h.remove()
    return view
