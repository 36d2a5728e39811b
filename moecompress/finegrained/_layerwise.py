"""The language-modelling loss's gradient at every MoE block output, one decoder layer at a time.

HEAPr needs ``dL/dy`` at each MoE block output ``y`` (``heapr.py``). Its in-memory pass is one
forward and one backward of the whole model, which keeps every layer's weights alive on the GPU
until the backward ends (autograd saves them), so it cannot stream. This is the same gradient
with activation checkpointing at decoder-layer boundaries (as gradient checkpointing does):

1. forward, layer by layer (``capture.LayerCursor``): the inputs of every decoder layer are kept,
   per batch, in CPU memory;
2. the loss's gradient w.r.t. the last layer's output, through the model's own head (norm, LM
   head, whatever the family does there): the model runs with its decoder layers replaced by
   stand-ins that return that output (a few sequences at a time where the vocabulary logits of
   a whole batch would not fit a small GPU cap);
3. from the last layer down: the layer is onloaded once, and for each batch it runs again on its
   recorded input, with autograd, and is differentiated with the gradient of its output; that
   gives ``dL/dy`` for its MoE block (handed to ``visit``) and ``dL/d(input)``, the gradient of
   the layer below's output.

The GPU holds one decoder layer and one batch's graph through it. Each layer repeats the same
operations on the same operands as the whole-model pass, so the gradients are the same numbers
(``tests/test_finegrained.py`` compares them bit for bit).
"""

from __future__ import annotations

import contextlib
import operator
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import MoELayer, MoEModel, Routing
from ..capture import LayerCursor, _bar, _to, batches_of
from ..onload import hooks_bypassed, onloaded

# visit(layer, x [T, H], routing, dL/dy) for every MoE layer and batch: layers last to first,
# batches in order within a layer
Visit = Callable[[MoELayer, torch.Tensor, Routing, torch.Tensor], None]


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the tokens (HEAPr's loss)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum")


class _Output(nn.Module):
    """Stands in for a decoder layer: the first one returns the last layer's recorded output, so
    that the model's forward computes only its head on it; the others pass it through."""

    def __init__(self, value: list):
        super().__init__()
        self.value = value

    def forward(self, hidden_states, *args, **kwargs):
        return self.value.pop() if self.value else hidden_states


# GPU bytes of vocabulary logits (and their float32 copy and gradient) the head may hold at once:
# a batch of 8 x 512 tokens of a 50k vocabulary is ~2.5 GB, more than a 4 GiB cap leaves.
HEAD_BUDGET = 512 << 20


def _head_grad(model, layers, last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """dL/d(last decoder layer output) for one batch, a few sequences at a time (the loss is a
    sum over tokens, so each sequence's gradient depends on its own logits only): at most
    :data:`HEAD_BUDGET` bytes of logits. Tiny vocabularies take the batch at once."""
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, HEAD_BUDGET // max(1, 12 * vocab * ids.shape[1]))  # bf16/fp32 logits, fp32 copy, grads
    if rows >= ids.shape[0]:
        return _head_grad_rows(model, layers, last, ids)
    return torch.cat([_head_grad_rows(model, layers, last[i:i + rows], ids[i:i + rows])
                      for i in range(0, ids.shape[0], rows)])


def _head_grad_rows(model, layers, last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    h = last.detach().requires_grad_(True)
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Output([h] if i == 0 else [])
    try:
        with torch.enable_grad():
            loss = lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
            (grad,) = torch.autograd.grad(loss, [h])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return grad


def _layer_backward(decoder_layer: nn.Module, moe: MoELayer | None, h: torch.Tensor, args, grad: torch.Tensor,
                    need_input: bool, visit: Visit) -> torch.Tensor | None:
    """Run one decoder layer on ``h`` with autograd and differentiate with ``grad`` (of its output)."""
    seen = []
    hooks = []
    if moe is not None:
        routings = []

        def on_router(mod, inp, out):
            with torch.no_grad():
                routings.append(moe.routing_from_router_output(
                    tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)))

        def on_block(mod, inp, out):
            y = out[0] if isinstance(out, tuple) else out
            seen.append((inp[0].detach().reshape(-1, inp[0].shape[-1]), routings.pop(), y))

        hooks = [moe.router.register_forward_hook(on_router), moe.block.register_forward_hook(on_block)]
    if moe is None and not need_input:  # a dense first layer: nothing to ask of it
        return None
    # the input needs a gradient even where its own is not asked for: the graph starts there
    h = h.detach().requires_grad_(True)
    a, kw = args
    try:
        with torch.enable_grad():
            out = decoder_layer(h, *a, **kw)
            out = out[0] if isinstance(out, tuple) else out
            wanted = [y for *_, y in seen] + ([h] if need_input else [])
            grads = torch.autograd.grad(out, wanted, grad_outputs=grad)
    finally:
        for hook in hooks:
            hook.remove()
    if seen:
        x, routing, _ = seen[0]
        visit(moe, x, routing, grads[0])
    return grads[-1] if need_input else None


def layerwise_block_grads(model, tokens: torch.Tensor, visit: Visit, *, batch_size: int, view: MoEModel,
                          progress: bool = True) -> None:
    """Call ``visit`` with every MoE layer's input, routing and ``dL/dy`` for every batch of
    ``tokens`` [N, S] (module docstring); ``visit`` runs while the layer's weights are onloaded."""
    layers = operator.attrgetter(view.spec.layers_path)(model)
    last = len(layers) - 1
    # every layer's inputs are kept for the backward sweep: in CPU memory
    cursor = LayerCursor(model, tokens, batch_size=batch_size, view=view, until=last, device_store=False)
    inputs = []
    with _bar(progress) as bar:
        task = bar.add_task("HEAPr gradients, layer by layer", total=2 * len(layers))
        for i in range(last + 1):
            inputs.append(list(cursor.hidden))  # advance replaces the list's tensors, never edits them
            cursor.advance(i)
            bar.advance(task)
        device = cursor.device
        grads = [_head_grad(model, layers, h.to(device), ids.to(device)).to("cpu")
                 for h, ids in zip(cursor.hidden, batches_of(tokens, batch_size))]
        for i in range(last, -1, -1):
            with contextlib.ExitStack() as stack:
                stack.enter_context(onloaded(layers[i]))
                stack.enter_context(hooks_bypassed([layers[i]]))
                for b, h in enumerate(inputs[i]):
                    g = _layer_backward(layers[i], cursor.moe.get(i), h.to(device), _to(cursor.args[i][b], device, {}),
                                        grads[b].to(device), need_input=i > 0, visit=visit)
                    grads[b] = g.to("cpu") if g is not None else None
            inputs[i] = None  # free the layer's activations
            bar.advance(task)
