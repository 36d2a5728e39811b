"""Run calibration tokens through a model and hand every MoE layer's traffic to observers.

This is the one place where stages see activations: statistics, pruning scores, merging and
quantization all register an observer and receive, per MoE layer and batch, the layer input
``x`` [T, H], the routing decided by the model's own router, and the block output ``y``.
Everything is batched (no Python loop per token).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Protocol

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .arch import MoELayer, MoEModel, Routing, moe_view


class Observer(Protocol):
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        """Called once per MoE layer and batch, in layer order, under ``torch.no_grad``.

        An observer may also define ``end_batch()``, called after every batch (e.g. to reduce
        what it kept of all layers at once), and ``reads_weights(layer) -> bool``: a streamed
        layer's weights are onloaded for the observers only if one of them reads them (an
        observer without the method is assumed to)."""


class _StopForward(Exception):
    """Raised after the ``stop_after`` layer's observers ran: the rest of the forward is skipped."""


def batches_of(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


def onloaded(module: torch.nn.Module) -> contextlib.ExitStack:
    """Context in which every weight of ``module`` is materialised on its execution device.

    A streamed model (accelerate offload, see ``load_model(max_gpu_memory=...)``) keeps each
    leaf module's weights offloaded except while that leaf runs; observers that read expert
    weights after the block ran need them onloaded again, one MoE block at a time.
    """
    stack = contextlib.ExitStack()
    try:
        from accelerate.utils import align_module_device, has_offloaded_params
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return stack
    for m in module.modules():
        if has_offloaded_params(m):
            stack.enter_context(align_module_device(m))
    return stack


def execution_device(model) -> torch.device:
    """Where inputs must go: the embedding's execution device for a streamed (offloaded)
    model, whose parameters may sit on the meta device; else the first parameter's device."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


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
    stop_after: int | None = None,
) -> MoEModel:
    """Forward ``tokens`` [N, S] in batches; every observer sees every MoE layer's traffic.

    ``stop_after`` (a decoder layer index): each batch's forward ends once that MoE layer's
    observers ran, for stages that work on one layer (or a group of layers) at a time.
    """
    view = view or moe_view(model)
    observers = list(observers)
    device = execution_device(model)
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
            # onload a streamed block only for observers that read its weights
            needed = any(getattr(obs, "reads_weights", None) is None or obs.reads_weights(layer) for obs in observers)
            with onloaded(layer.block) if needed else contextlib.nullcontext():
                for obs in observers:
                    obs.observe(layer, x, routing, y)
            if layer.layer_idx == stop_after:
                raise _StopForward

        hooks.append(layer.router.register_forward_hook(on_router))
        hooks.append(layer.block.register_forward_hook(on_block))
    chunks = batches_of(tokens, batch_size)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not progress, transient=True) as bar:
            task = bar.add_task(description, total=len(chunks))
            for chunk in chunks:
                try:
                    _decoder(model)(input_ids=chunk.to(device), use_cache=False)
                except _StopForward:
                    pass
                for obs in observers:
                    end_batch = getattr(obs, "end_batch", None)
                    if end_batch is not None:
                        end_batch()
                bar.advance(task)
    finally:
        for h in hooks:
            h.remove()
    return view
