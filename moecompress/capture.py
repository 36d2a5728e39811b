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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from .arch import MoELayer, MoEModel, Routing, moe_view
from .onload import hooks_bypassed, is_streamed, module_execution_device, onloaded, resident


class Observer(Protocol):
    def observe(self, layer: MoELayer, x: torch.Tensor, routing: Routing, y: torch.Tensor) -> None:
        """Called once per MoE layer and batch, in layer order, under ``torch.no_grad``.

        An observer may also define ``end_batch()``, called after every batch (e.g. to reduce
        what it kept of all layers at once), and ``reads_weights(layer) -> bool``: a streamed
        layer's weights are onloaded for the observers only if one of them reads them (an
        observer without the method is assumed to). ``onload_with(layer) -> list[Module]``
        names modules outside the model that it runs on the layer's inputs (the re-fit's
        original blocks): a layer-by-layer run keeps them onloaded with the layer. Under
        :class:`LayerCursor` an observer may define ``layer_output(layer_idx, batch, out)``:
        called with each decoder layer's output hidden states of each batch, in order (the
        repair's residual-stream target needs what the whole decoder layer produced)."""


class _StopForward(Exception):
    """Raised after the ``stop_after`` layer's observers ran: the rest of the forward is skipped."""


def batches_of(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [tokens[i : i + batch_size] for i in range(0, tokens.shape[0], batch_size)]


def execution_device(model) -> torch.device:
    """Where inputs must go: where the embedding computes (its hook's execution device for a
    streamed model, whose parameters may sit on the meta device)."""
    return module_execution_device(model.get_input_embeddings())


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
    if layer_by_layer:
        cursor = LayerCursor(model, tokens, batch_size=batch_size, view=view, until=stop_after)
        cursor.advance(cursor.until, observers, progress=progress, description=description)
        return view
    chunks = batches_of(tokens, batch_size)
    device = execution_device(model)
    with _observing(view, observers, stop_after), _bar(progress) as bar:
        task = bar.add_task(description, total=len(chunks))
        for chunk in chunks:
            try:
                _decoder(model)(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
            _end_batch(observers)
            bar.advance(task)
    return view


def _bar(progress: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not progress, transient=True)


@contextlib.contextmanager
def _observing(view: MoEModel, observers: list[Observer], stop_after: int | None = None):
    """Hooks that hand each MoE layer's input, routing and output to the observers."""
    routings: dict[int, Routing] = {}
    hooks = []
    for layer in view if observers else []:
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
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _end_batch(observers: list[Observer]) -> None:
    for obs in observers:
        end_batch = getattr(obs, "end_batch", None)
        if end_batch is not None:
            end_batch()


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
            memo[id(obj)] = moved(obj, device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, the same values. From a GPU to the CPU the copy goes to pinned
    (page-locked) memory without waiting for it, and back from there without waiting either:
    pageable copies run at a fraction of the link's rate and stop the host until done (on the
    OLMoE-1B-7B shape streamed, an H200 spent 28.7 s of the default prune in tensor copies; with
    this and ``merge.offload.write_back``'s named edits its re-fit went from 58.0 s to 35.1 s,
    docs/benchmarks.md). Copies are exact; :meth:`LayerCursor.advance` waits for them before it
    returns, so what it stored is complete when anyone reads it."""
    device = torch.device(device)
    if device.type == "cpu" and t.is_cuda:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)
    return t.to(device, non_blocking=t.device.type == "cpu" and t.is_pinned())


ACTIVATIONS_DEVICE_SHARE = 32  # hidden states stay on the GPU up to 1/32 of its memory (see _activation_store)


def _activation_store(model, device: torch.device, first_calls: list) -> torch.device:
    """Where a cursor keeps the hidden states between layers: on the GPU of a model held in GPU
    memory when they take at most 1/``ACTIVATIONS_DEVICE_SHARE`` of it (a property of the
    device, not of its free memory, so the same inputs always run the same way), else in CPU
    memory. Measured on an H200 (docs/benchmarks.md, "The default end to end, measured"): the
    copies to and from the CPU, one per batch and layer pass, took the default's re-fit of the
    OLMoE shape to 28.1 s; kept on the GPU it takes 11.1 s. A
    streamed model keeps them in CPU memory: its GPU cap is for the layer being run. The
    values are the same either way (a copy is exact)."""
    if device.type != "cuda" or is_streamed(model):
        return torch.device("cpu")
    size = sum(h.numel() * h.element_size() for h, _, _ in first_calls)
    total = torch.cuda.get_device_properties(device).total_memory
    # a model that nearly fills the GPU keeps them in CPU memory: up to four copies are alive at
    # once (a cursor's states, the repair's original stream), and the stage needs room besides
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
    fits = size * ACTIVATIONS_DEVICE_SHARE <= total and weights + 4 * size <= 0.9 * total
    return device if fits else torch.device("cpu")


class LayerCursor:
    """The calibration batches' hidden states in front of one decoder layer, moved forward a
    layer at a time (the layer-by-layer schedule; llm-compressor's sequential pipeline).

    On creation the model's own forward records every decoder layer's arguments for every
    batch, with stand-ins for the layers that pass the hidden states through (so this costs
    the embeddings and masks only, and per-layer masks of sliding-window families come out
    right). :meth:`advance` then runs the layers one at a time, each onloaded once for all
    batches. Activations wait in CPU memory between layers, so the GPU holds one layer and
    one batch (a model held in GPU memory keeps them there when they are small enough,
    ``_activation_store``). A stage that edits layers as it goes uses :meth:`editing`.
    """

    @torch.no_grad()
    def __init__(self, model, tokens: torch.Tensor, *, batch_size: int = 8, view: MoEModel | None = None,
                 until: int | None = None, device_store: bool = True):
        self.view = view or moe_view(model)
        self.device = execution_device(model)
        self.layers = operator.attrgetter(self.view.spec.layers_path)(model)
        self.until = until if until is not None else max(layer.layer_idx for layer in self.view)
        self.moe = {layer.layer_idx: layer for layer in self.view}
        chunks = batches_of(tokens, batch_size)
        calls: list[list] = [[] for _ in range(self.until + 1)]
        originals = list(self.layers[: self.until + 1])
        for i in range(self.until + 1):
            self.layers[i] = _RecordInputs(calls[i], last=i == self.until)
        try:
            for chunk in chunks:
                try:
                    _decoder(model)(input_ids=chunk.to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        # The arguments of one batch are shared by all layers (the same tensors): stored once.
        # device_store=False: the caller keeps many layers' hidden states (HEAPr): CPU memory
        self.store = _activation_store(model, self.device, calls[0]) if device_store else torch.device("cpu")
        memo: dict = {}
        self.hidden = [moved(h, self.store) for h, _, _ in calls[0]]
        self.args = [[_to((a, kw), self.store, memo) for _, a, kw in layer_calls] for layer_calls in calls]
        self.position = 0  # self.hidden are the inputs of this decoder layer
        self._copies_done()

    @contextlib.contextmanager
    def editing(self, through: int, observers: Iterable[Observer], *, progress: bool = False,
                description: str = "calibrating", hold: bool = False):
        """Advance through layer ``through`` with ``observers``; the block then edits those
        layers (from what the observers saw), and on leaving it the layers run again, with
        their edits, so that later layers get the edited model's activations. Layer-wise
        sequential compression (GPTQ, NAEE, the re-fit): each layer runs twice, instead of a
        pass from the embeddings per layer.

        ``hold``: a streamed layer edited alone stays on the GPU for the whole block
        (``onload.resident``, in the room accelerate keeps for the one onloaded layer): brought
        over once for its two runs and the block, instead of once per run. Only for a block that
        edits no weight of the layer's own offloaded modules in place (NAEE's routing hooks, the
        re-fit's blocks that it writes back or that are held apart): such an edit would not see
        the layer as offloaded, and the weights would be onloaded from their store again."""
        with self.holding(through, progress=progress, description=description) if hold else contextlib.nullcontext():
            start = self.state()
            # the observed run's outputs are replaced by the edited run's (or, after the last
            # recorded layer, never used): not stored, which streamed saves a copy to the CPU
            self.advance(through, observers, progress=progress, description=description, discard_outputs=True)
            yield
            if through < self.until:
                self.restore(start)
                self.advance(through, progress=progress, description=f"{description}: edited outputs")

    @contextlib.contextmanager
    def holding(self, through: int, *, progress: bool = False, description: str = "calibrating"):
        """Decoder layer ``through`` on the GPU for the whole block (``onload.resident``, in the
        room accelerate keeps for the one onloaded layer; a no-op in memory), once the dense layers
        before it have run (they are not edited, and two layers are never held). Only where the
        layers between the cursor and ``through`` are dense; else nothing is held. A caller that
        works on the layer after :meth:`editing` (NAEE's ``on_layer``) holds it around both."""
        alone = all(i not in self.moe for i in range(self.position, through))
        if alone and through > self.position:
            self.advance(through - 1, progress=progress, description=description)
        with resident(self.layers[through]) if alone else contextlib.nullcontext():
            yield

    def state(self) -> tuple[int, list[torch.Tensor]]:
        if self.hidden is None:
            raise RuntimeError("the cursor's last outputs were discarded: restore a state first")
        return self.position, list(self.hidden)

    def restore(self, state: tuple[int, list[torch.Tensor]]) -> None:
        self.position, hidden = state
        self.hidden = list(hidden)

    @torch.no_grad()
    def advance(self, through: int, observers: Iterable[Observer] = (), *, progress: bool = False,
                description: str = "calibrating", discard_outputs: bool = False) -> None:
        """Run decoder layers ``position..through`` on every batch; observers see their MoE layers.
        ``discard_outputs``: layer ``through``'s outputs are not kept (the caller restores an
        earlier :meth:`state` before advancing again)."""
        observers = list(observers)
        if self.hidden is None:
            raise RuntimeError("the cursor's last outputs were discarded: restore a state before advancing")
        if not self.position <= through <= self.until:
            raise ValueError(f"cannot advance from layer {self.position} through {through} (recorded up to {self.until})")
        with _observing(self.view, observers), _bar(progress) as bar:
            task = bar.add_task(description, total=(through + 1 - self.position) * len(self.hidden))
            for i in range(self.position, through + 1):
                moe = self.moe.get(i)
                extra = [m for obs in observers for m in (getattr(obs, "onload_with", lambda _: [])(moe) if moe else [])]
                with contextlib.ExitStack() as stack:
                    for module in (self.layers[i], *extra):
                        stack.enter_context(onloaded(module))
                    stack.enter_context(hooks_bypassed([self.layers[i], *extra]))
                    for b, h in enumerate(self.hidden):
                        a, kw = _to(self.args[i][b], self.device, {})
                        out = self.layers[i](moved(h, self.device), *a, **kw)
                        if moe is not None:
                            _end_batch(observers)
                        out = out[0] if isinstance(out, tuple) else out
                        for obs in observers:
                            if hasattr(obs, "layer_output"):
                                obs.layer_output(i, b, out)
                        if not (discard_outputs and i == through):
                            self.hidden[b] = moved(out, self.store)
                        bar.advance(task)
        self.position = through + 1
        if discard_outputs:
            self.hidden = None
        self._copies_done()

    def _copies_done(self) -> None:
        """Wait for the asynchronous copies into pinned CPU memory (:func:`moved`)."""
        if self.store.type == "cpu" and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
