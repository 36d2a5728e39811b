"""Working with accelerate's offload (a streamed model, ``checkpoint.load_model(max_gpu_memory=...)``).

A streamed model keeps some weights offloaded (CPU memory or disk) and accelerate's hooks
onload each module's weights around its forward. Stages need a few more moves, gathered here:
onload a whole module for a while (:func:`onloaded`), run modules without the per-call
onloading while they are onloaded (:func:`hooks_bypassed`), copy a module without its hooks
(:func:`detached_copy`), and ask where a module computes (:func:`module_execution_device`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from typing import Iterable, Iterator

import torch
from torch import nn

# What accelerate's add_hook_to_module puts in a module's __dict__.
HOOK_ATTRIBUTES = ("_hf_hook", "_old_forward", "forward")


def is_streamed(model: nn.Module) -> bool:
    """Whether some of ``model``'s weights are offloaded (onloaded by accelerate hooks as they run)."""
    from accelerate.utils import has_offloaded_params

    return any(has_offloaded_params(m) for m in model.modules())


def onloaded(module: torch.nn.Module) -> contextlib.ExitStack:
    """Context in which every weight of ``module`` is materialised on its execution device.

    A streamed model (accelerate offload, see ``load_model(max_gpu_memory=...)``) keeps each
    leaf module's weights offloaded except while that leaf runs; observers that read expert
    weights after the block ran need them onloaded again, one MoE block at a time.
    """
    from accelerate.utils import align_module_device, has_offloaded_params

    stack = contextlib.ExitStack()
    for m in module.modules():
        if has_offloaded_params(m):
            stack.enter_context(align_module_device(m))
    return stack


@contextlib.contextmanager
def hooks_bypassed(modules: Iterable[nn.Module], *, keep_forward: bool = True) -> Iterator[None]:
    """Take accelerate's hooks off the modules (and their submodules) for the block, then put
    them back.

    Running modules that are onloaded as a whole (:func:`onloaded`), the hooks would copy every
    weight in again at each call; with ``keep_forward`` a forward replaced inside the hook
    (``_old_forward``, e.g. the statistics' fused experts) is what runs. Without it the modules
    have their class's forward, as a copy made inside must (:func:`detached_copy`: no hooks,
    no weight maps dragged along)."""
    saved = []
    for module in modules:
        for m in module.modules():
            if "_hf_hook" in m.__dict__:
                attrs = {a: m.__dict__.pop(a) for a in HOOK_ATTRIBUTES if a in m.__dict__}
                saved.append((m, attrs))
                if keep_forward and "_old_forward" in attrs:
                    m.forward = attrs["_old_forward"]
    try:
        yield
    finally:
        for m, attrs in reversed(saved):
            m.__dict__.pop("forward", None)
            m.__dict__.update(attrs)


@contextlib.contextmanager
def resident(module: nn.Module) -> Iterator[None]:
    """Every weight of ``module`` on its execution device for the whole block, with its hooks
    off: a stage that runs or reads a streamed module several times in a row (a pass, then a
    build from it, then another pass) brings it to the GPU once, where :func:`onloaded` and the
    hooks would copy it in again each time. Nested :func:`onloaded` calls and forwards inside
    use these weights. The GPU holds the whole module meanwhile. No-op in memory."""
    with onloaded(module), hooks_bypassed([module]):
        yield


def detached_copy(module: nn.Module, *, skip: Iterable[torch.Tensor] = (), share: Iterable[object] = ()) -> nn.Module:
    """A deep copy of ``module`` without accelerate hooks. Tensors in ``skip`` are not copied:
    they become meta tensors of the same shape (to be filled by the caller); objects in
    ``share`` (the model config) are shared, not copied."""
    memo: dict = {}
    for t in skip:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    for o in share:
        memo[id(o)] = o
    with hooks_bypassed([module], keep_forward=False):
        return copy.deepcopy(module, memo)


def module_execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its hooks' execution device, else its first real tensor's."""
    for m in module.modules():
        dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    for t in module.parameters():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class _CastWeights(Mapping):
    """An accelerate hook's ``weights_map`` whose floating-point tensors come back in ``dtype``."""

    def __init__(self, inner, dtype: torch.dtype):
        self.inner, self.dtype = inner, dtype

    def __getitem__(self, key):
        t = self.inner[key]
        return t.to(self.dtype) if t.is_floating_point() else t

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def cast_model(model: nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, also for a streamed model (which accelerate refuses to move): its
    resident tensors are cast, and its offloaded ones as they are read (onloaded, or by
    ``save_pretrained``), through their hooks' weight maps."""
    if not is_streamed(model):
        model.to(dtype)
        return
    model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(h, "weights_map", None)
            if weights is not None and not isinstance(weights, _CastWeights):
                h.weights_map = _CastWeights(weights, dtype)
