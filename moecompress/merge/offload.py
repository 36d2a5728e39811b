"""Merged MoE blocks of a streamed model: built one layer at a time, kept on disk between uses.

A streamed model (``load_model(max_gpu_memory=...)``) holds its weights offloaded and onloads
each leaf module while it runs (accelerate hooks). Merging builds, per MoE layer, a new block
with fewer experts; for a streamed model that block is written to a safetensors file and
hooked the same way (:func:`offload_block`), so the merged model runs, and its observers see
onloaded weights (``onload.onloaded``), without ever holding more than one layer. Edits made
to an onloaded offloaded block (the re-fit) are saved with :func:`write_back`, in place: only
the tensors that changed are written again. Stages that edit a streamed model's own layers in
place (fine-grained pruning: masks, fewer neurons, fewer experts) use :func:`edited`, which
moves an edited accelerate-offloaded block onto such a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import aligned
from ..onload import HOOK_ATTRIBUTES, is_streamed, module_execution_device, onloaded
from ..shardwriter import DTYPE_NAMES, tensor_bytes


class SafetensorsWeights(Mapping):
    """A lazy name -> tensor map over one safetensors file (accelerate's ``weights_map``)."""

    def __init__(self, path: str | os.PathLike, tensors: dict[str, torch.Tensor] | None = None):
        """The file at ``path``; written first with ``tensors`` when given."""
        self.path = Path(path)
        if tensors is not None:
            self.write(tensors)
        with safe_open(self.path, framework="pt") as f:
            self._keys = list(f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(self.path, framework="pt") as f:
            # the file's buffer can sit at any offset (see checkpoint.aligned)
            return aligned(f.get_tensor(key))

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def update(self, tensors: dict[str, torch.Tensor], edited: set[str] | None = None) -> list[str]:
        """Write the tensors whose bytes changed over their own bytes in the file; returns their
        names. The rest of the file is not written again (after the re-fit, only the re-fitted
        down projections: the merged block's file is written once). ``edited``: the names the
        caller changed; only those are written, without reading the file's bytes to compare
        (on the OLMoE-1B-7B shape streamed, the comparison read and the copy of every tensor of
        every block to the CPU took 11.4 s of the re-fit's 58 s, docs/benchmarks.md). A name,
        shape or dtype the file does not hold rewrites the whole file (:meth:`write`)."""
        header, start = _read_header(self.path)
        if set(tensors) != set(self._keys) or any(list(t.shape) != header[k]["shape"] or
                                                  DTYPE_NAMES.get(t.dtype) != header[k]["dtype"] for k, t in tensors.items()):
            self.write(tensors)
            return sorted(tensors)
        changed = []
        with open(self.path, "r+b") as fh:
            for name in sorted(tensors if edited is None else edited & set(tensors)):
                begin, end = header[name]["data_offsets"]
                data = tensor_bytes(tensors[name])
                fh.seek(start + begin)
                if edited is None and fh.read(end - begin) == data:  # reading from the page cache is cheaper than writing
                    continue
                fh.seek(start + begin)
                fh.write(data)
                changed.append(name)
        return changed

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the file's tensors (written aside, then renamed: readers never see half a file)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        save_file({k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())}, tmp)
        os.replace(tmp, self.path)
        self._keys = sorted(tensors)


def offload_block(block: nn.Module, path: str | os.PathLike, device: torch.device) -> None:
    """Write ``block``'s parameters to ``path`` and hook it like a streamed layer: parameters
    live on the meta device and are onloaded to ``device`` only while a leaf runs (or inside
    ``onload.onloaded``); buffers stay on ``device``."""
    _hook(block, SafetensorsWeights(path, dict(block.named_parameters())), device)


def _hook(block: nn.Module, weights: SafetensorsWeights, device: torch.device) -> None:
    from accelerate.hooks import attach_align_device_hook

    # Hooks already there (accelerate's, on a streamed model's own block) go first: attaching
    # would chain the new ones after them, and their removal (detach_hook) would onload the old
    # weights into the edited shapes.
    for m in block.modules():
        if "_hf_hook" in m.__dict__:
            attrs = {a: m.__dict__.pop(a) for a in HOOK_ATTRIBUTES if a in m.__dict__}
            old = attrs.get("_old_forward")
            if old is not None and getattr(old, "__func__", None) is not type(m).forward:
                m.forward = old  # a forward replaced before the hook (keep it), not the class's
    attach_align_device_hook(block, execution_device=device, offload=True, weights_map=weights)
    block.__dict__["_moecompress_weights"] = weights


@contextlib.contextmanager
def edited(block: nn.Module, path: str | os.PathLike | None) -> Iterator[None]:
    """Edit ``block`` in place, whether held in memory or streamed: the block runs with every
    weight onloaded. On leaving, the edits of a block with offloaded weights are kept: written
    in place in its file when it is one of ours (:func:`write_back`), else saved to a new file
    ``path`` that the block is hooked to from then on (:func:`offload_block`'s hooks replace
    accelerate's). Edits may change shapes (fewer neurons or experts). Every later onload, and
    ``save_pretrained``, reads the edited weights; the GPU holds this one block meanwhile.
    In memory the edits are already in place."""
    from accelerate.utils import has_offloaded_params

    if not any(has_offloaded_params(m) for m in block.modules()):
        yield
        return
    ours, device = is_offloaded(block), module_execution_device(block)
    with onloaded(block):
        yield
        # read before leaving: the onloaded weights go back to the meta device then
        weights = None if ours else SafetensorsWeights(path, dict(block.named_parameters()))
        if ours:
            write_back(block)
    if weights is not None:
        _hook(block, weights, device)


def offload_folder_for(model, folder: str | os.PathLike | None) -> Path | None:
    """Where a stage's new or edited blocks go: ``folder`` if given; for a streamed (offloaded)
    model a new temporary folder, deleted with the model; None (in memory) otherwise."""
    if folder is None:
        if not is_streamed(model):
            return None
        folder = tempfile.mkdtemp(prefix="moecompress-offload-")
        weakref.finalize(model, shutil.rmtree, folder, True)  # lives as long as the model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def layer_editor(model, folder: str | os.PathLike | None = None):
    """``edit(layer)``: :func:`edited` for an MoE layer's block, whose file (if it needs one)
    goes in :func:`offload_folder_for` ``(model, folder)``."""
    where = offload_folder_for(model, folder)
    return lambda layer: edited(layer.block, where / f"edited-layer-{layer.layer_idx}.safetensors" if where else None)


def is_offloaded(block: nn.Module) -> bool:
    return "_moecompress_weights" in block.__dict__


@torch.no_grad()
def write_back(block: nn.Module, edited: list[torch.Tensor] | None = None) -> list[str]:
    """Save the edited parameters of an onloaded block from :func:`offload_block`, in place in
    its file (a no-op for a block held in memory, whose edits are already in place). Returns
    the names written. ``edited``: the tensors (or views of them) the caller changed: only the
    parameters holding them are written, without comparing bytes; by default every parameter
    whose bytes differ from the file's."""
    weights = block.__dict__.get("_moecompress_weights")
    if weights is None:
        return []
    params = dict(block.named_parameters())
    names = None
    if edited is not None:
        storages = {t.untyped_storage().data_ptr() for t in edited}
        names = {k for k, p in params.items() if p.untyped_storage().data_ptr() in storages}
    return weights.update(params, names)


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n)), 8 + n
