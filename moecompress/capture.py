"""Run calibration tokens through a model and hand every MoE layer's traffic to observers.

This is the one place where stages see activations: statistics, pruning scores, merging and
quantization all register an observer and receive, per MoE layer and batch, the layer input
``x`` [T, H], the routing decided by the model's own router, and the block output ``y``.
Everything is batched (no Python loop per token).

Two schedules, with identical results (the same operations on the same operands):

* batch by batch (a model in memory): each batch runs through the whole model;
* layer by layer (a streamed model, see ``load_model(max_gpu_memory=...)``): the inputs of
  every decoder layer are recorded once, then each decoder layer is onloaded *once* and all
  batches go through it before the next layer (llm-compressor's sequential pipeline). Batch
  by batch, a streamed model would send every offloaded weight to the GPU once per batch.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Iterable, Protocol

import torch
from torch import nn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .arch import MoELayer, MoEModel, Routing, moe_view


class Observer(Protocol):
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        """Called once per MoE layer and batch, in layer order, under ``torch.no_grad``.

        An observer may also define ``end_batch()``, called after every batch (e.g. to reduce
        what it kept of all layers at once), and ``reads_weights(layer) -> bool``: a streamed
        layer's weights are onloaded for the observers only if one of them reads them (an
        observer without the method is assumed to). ``onload_with(layer) -> list[Module]``
        names modules outside the model that it runs on the layer's inputs (the re-fit's
        original blocks): a layer-by-layer run keeps them onloaded with the layer."""


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


# What accelerate's add_hook_to_module puts in a module's __dict__.
HOOK_ATTRIBUTES = ("_hf_hook", "_old_forward", "forward")


def is_streamed(model: nn.Module) -> bool:
    """Whether some of ``model``'s weights are offloaded (onloaded by accelerate hooks as they run)."""
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(m) for m in model.modules())


@contextlib.contextmanager
def hooks_bypassed(modules: Iterable[nn.Module]):
    """Run the modules' own forwards instead of accelerate's wrappers, for modules that are
    onloaded as a whole (``onloaded``): the wrappers would copy every weight in again at each
    call. A forward replaced inside the hook (``_old_forward``, e.g. the statistics' fused
    experts) is kept."""
    saved = []
    for module in modules:
        for m in module.modules():
            if "_hf_hook" in m.__dict__:
                attrs = {a: m.__dict__.pop(a) for a in HOOK_ATTRIBUTES if a in m.__dict__}
                saved.append((m, attrs))
                if "_old_forward" in attrs:
                    m.forward = attrs["_old_forward"]
    try:
        yield
    finally:
        for m, attrs in reversed(saved):
            m.__dict__.pop("forward", None)
            m.__dict__.update(attrs)


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
    layer_by_layer: bool | None = None,
) -> MoEModel:
    """Forward ``tokens`` [N, S] in batches; every observer sees every MoE layer's traffic.

    ``stop_after`` (a decoder layer index): the forward ends once that MoE layer's observers
    ran, for stages that work on one layer (or a group of layers) at a time.
    ``layer_by_layer`` picks the schedule (module docstring); by default a streamed model runs
    layer by layer and a model in memory batch by batch. Observers see each (layer, batch)
    with the same tensors either way, batches of a layer in order; ``end_batch`` follows
    every batch of every MoE layer when layer by layer.
    """
    view = view or moe_view(model)
    observers = list(observers)
    if layer_by_layer is None:
        layer_by_layer = is_streamed(model)
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
    run = _layer_by_layer if layer_by_layer else _batch_by_batch
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      disable=not progress, transient=True) as bar:
            run(model, chunks, observers, view, stop_after, bar, description)
    finally:
        for h in hooks:
            h.remove()
    return view


def _end_batch(observers: list[Observer]) -> None:
    for obs in observers:
        end_batch = getattr(obs, "end_batch", None)
        if end_batch is not None:
            end_batch()


def _batch_by_batch(model, chunks, observers, view, stop_after, bar, description) -> None:
    device = execution_device(model)
    task = bar.add_task(description, total=len(chunks))
    for chunk in chunks:
        try:
            _decoder(model)(input_ids=chunk.to(device), use_cache=False)
        except _StopForward:
            pass
        _end_batch(observers)
        bar.advance(task)


class _RecordInputs(nn.Module):
    """Stands in for a decoder layer while the model records every layer's call: keeps the
    arguments (masks, position embeddings...) and passes the hidden states through."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls = calls
        self.last = last  # the later layers are not needed: end the forward here

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def _to(obj, device, memo: dict):
    """``obj`` (tensors in tuples, lists, dicts) with every tensor on ``device``; a tensor met
    twice is moved once (``memo``), so layers sharing a mask still share it."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _layer_by_layer(model, chunks, observers, view, stop_after, bar, description) -> None:
    """Record each decoder layer's inputs for every batch (the layers stand aside, so this
    costs the embeddings and masks only), then run the layers one at a time, each onloaded
    once for all batches. Recorded activations wait in CPU memory between layers, so GPU
    memory holds one layer and one batch; the model's own forward code computes every
    layer's arguments (per-layer masks of sliding-window families included)."""
    device = execution_device(model)
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    last = stop_after if stop_after is not None else max(layer.layer_idx for layer in view)
    moe_layers = {layer.layer_idx: layer for layer in view}
    calls: list[list] = [[] for _ in range(last + 1)]
    originals = list(decoder_layers[: last + 1])
    for i in range(last + 1):
        decoder_layers[i] = _RecordInputs(calls[i], last=i == last)
    try:
        for chunk in chunks:
            try:
                _decoder(model)(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, layer in enumerate(originals):
            decoder_layers[i] = layer
    # Batch b's hidden states and arguments of layer i, on the CPU; the arguments of one batch
    # are shared by all layers (the same tensors), so they are stored once.
    cpu_memo: dict = {}
    hidden = [h.to("cpu") for h, _, _ in calls[0]]
    args = [[_to((a, kw), "cpu", cpu_memo) for _, a, kw in layer_calls] for layer_calls in calls]
    del calls, cpu_memo
    task = bar.add_task(description, total=(last + 1) * len(chunks))
    for i in range(last + 1):
        moe = moe_layers.get(i)
        extra = [m for obs in observers for m in (getattr(obs, "onload_with", lambda _: [])(moe) if moe else [])]
        with contextlib.ExitStack() as stack:
            for module in (decoder_layers[i], *extra):
                stack.enter_context(onloaded(module))
            stack.enter_context(hooks_bypassed([decoder_layers[i], *extra]))
            for b in range(len(chunks)):
                memo: dict = {}
                a, kw = _to(args[i][b], device, memo)
                try:
                    out = decoder_layers[i](hidden[b].to(device), *a, **kw)
                except _StopForward:
                    out = None
                if moe is not None:
                    _end_batch(observers)
                if i < last:
                    out = out[0] if isinstance(out, tuple) else out
                    hidden[b] = out.to("cpu")
                bar.advance(task)
