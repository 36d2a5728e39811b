"""Load a checkpoint's decoder layers in a background thread, in order, while the caller computes.

Why: a stage that works a layer at a time (NAEE's selection, the re-fit) can start on layer 0
while later layers are still being read. Loading everything first made the default prune of the
OLMoE-1B-7B shape on one H200 spend 11.0 s of its 30.1 s reading before its first layer ran
(docs/benchmarks.md, "Session 13"); reading and computing then took turns instead of running
together.

How: transformers builds the model and loads everything outside the decoder layers
(``from_pretrained`` given a state dict of those tensors: embeddings, final norm, lm_head; the
layers' weights are left to its initialisation, and overwritten below). A daemon thread then
loads each decoder layer's checkpoint tensors, in layer order, with transformers' own loader
(``core_model_loading.convert_and_load_state_dict_in_model``: its renames and its fusing of
per-expert tensors into 3-D experts, the same code ``from_pretrained`` runs), so every weight is
what ``from_pretrained`` would have loaded (tests compare them bitwise per family). A forward
pre-hook on each decoder layer waits until that layer is loaded; code that reads weights other
than by running layers calls :func:`finish` first.

Soundness: each layer's loaded tensors are checked for NaN/Inf on their device before the layer
is released, the tensors outside the layers before the model is built, and the stored tensors
transformers does not load (unexpected keys, layers past the model's) where they are stored: the
guarantee of the file scan (``integrity.require_sound_input``: no weight is used before its
verdict), which this takes over (``integrity.take_over_scan``). A load that fails (a missing or misshapen tensor, NaN/Inf, a read error) raises its
one-line error in the computing thread at the first layer it did not release.

Used only where nothing needs the whole model before its layers run: in GPU memory (not
streamed), an unquantized local safetensors checkpoint, no remote code (``eligible``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

from .errors import MoECompressError

ON_CPU = False  # in GPU memory only by default (tests turn it on for the CPU)
SWITCH_INTERVAL = 1e-4  # seconds, while layers load (LayerLoad.__init__)
READ_AHEAD = 2  # layers read into the page cache ahead of the loading
READ_CHUNK = 1 << 24  # bytes per read
_loads: "weakref.WeakKeyDictionary[nn.Module, LayerLoad]" = weakref.WeakKeyDictionary()


def eligible(folder: Path | None, device, quantized: dict, streamed: bool, remote_code: bool) -> bool:
    """Whether a model can be loaded layer by layer in the background (module docstring)."""
    if streamed or quantized or remote_code or folder is None or not isinstance(device, (str, type(None))):
        return False
    if not any(Path(folder).glob("*.safetensors")):
        return False
    return torch.device(device or "cpu").type == "cuda" or ON_CPU


def _keys_by_layer(folder: Path, layers_path: str, num_layers: int) -> tuple[dict, dict, dict]:
    """The checkpoint's tensors (file, key) per decoder layer (stored under the model's own
    ``layers_path``: another module's ``layers``, a vision tower's, is not one); those of layers
    past the model's (multi-token-prediction layers, which transformers does not load); the others."""
    from .integrity import check_shards

    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.")
    layers: dict[int, dict[str, tuple[Path, str]]] = {i: {} for i in range(num_layers)}
    beyond: dict[str, tuple[Path, str]] = {}
    rest: dict[str, tuple[Path, str]] = {}
    for name, header in check_shards(folder).items():
        for key in header:
            m = pattern.match(key)
            i = int(m.group(1)) if m else None
            group = rest if i is None else layers[i] if i < num_layers else beyond
            group[key] = (folder / name, key)
    return layers, beyond, rest


class _Slices(dict):
    """key -> safetensors slice of the checkpoint's files, the files kept open while in use."""

    def __init__(self, entries: dict[str, tuple[Path, str]]):
        from safetensors import safe_open

        super().__init__()
        self._files = contextlib.ExitStack()
        opened = {}
        for key, (path, name) in entries.items():
            if path not in opened:
                opened[path] = self._files.enter_context(safe_open(path, framework="pt", device="cpu"))
            self[key] = opened[path].get_slice(name)

    def close(self) -> None:
        self._files.close()


class LayerLoad:
    """The background loading of one model's decoder layers (module docstring)."""

    def __init__(self, model: nn.Module, layers_path: str, layers: nn.ModuleList, layer_keys: dict, folder: Path,
                 device: torch.device, check_values: bool, beyond: dict | None = None, on_done=None):
        from transformers.conversion_mapping import get_model_conversion_mapping

        from .background import Background

        # not the model itself: it is the key of ``_loads`` (weak), which this must not keep alive
        self.config, self.base_model_prefix = model.config, model.base_model_prefix
        self.mapping = get_model_conversion_mapping(model, None, None)
        self.folder, self.device, self.check_values = folder, device, check_values
        self.beyond = beyond or {}  # tensors of layers past the model's: not loaded, still checked
        self.layers_path, self.on_done = layers_path, on_done  # on_done: called once every layer loaded and passed
        # The layer modules themselves, held now: the model's list may hold stand-ins for a while
        # (capture.LayerCursor records the layers' inputs by swapping them), and the loading must
        # not look the layers up by path then.
        self.layers = list(layers)
        self._read = [threading.Event() for _ in self.layers]
        self._ready = [threading.Event() for _ in self.layers]
        self._loading_ended, self._reading_ended = threading.Event(), threading.Event()
        self._hooks = [layer.register_forward_pre_hook(self._pre_hook(i)) for i, layer in enumerate(self.layers)]
        # The computing thread releases the interpreter's lock at every torch call and waits to take
        # it back while the loading runs Python (transformers' conversion): up to the switch
        # interval, 5 ms by default, per call. Shorter while loading (measured: NAEE's search,
        # thousands of small calls, took 10.0 s instead of 4.4 s beside the loading at 5 ms).
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        self._reader = Background(lambda stop: self._read_ahead(layer_keys, stop), "moecompress-layer-read")
        self._job = Background(lambda stop: self._load(layer_keys, stop), "moecompress-layer-load")

    def _pre_hook(self, i: int):
        def hook(module, args):
            self.wait(i)
        return hook

    def wait(self, i: int) -> None:
        """Until decoder layer ``i`` is loaded; its loading error, if it failed first."""
        while not self._ready[i].wait(0.05):
            if self._job.error is not None or not self._job.thread.is_alive():
                if not self._ready[i].is_set():
                    self._job.result()  # raises the loading error
                    raise RuntimeError(f"decoder layer {i} was not loaded")  # pragma: no cover

    def finish(self) -> None:
        """Until every layer is loaded; then the waiting hooks are removed."""
        try:
            self._job.result()
        finally:
            self._reader.stop.set()
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _read_ahead(self, layer_keys: dict, stop: threading.Event) -> None:
        """Read each layer's bytes from its files into the page cache, up to ``READ_AHEAD`` layers
        ahead of the loading: plain reads, during which the interpreter's lock is free (the
        safetensors slices the loading takes would otherwise fault the pages in while holding it)."""
        try:
            self._read_layers(layer_keys, stop)
        finally:
            self._reading_ended.set()

    def _read_layers(self, layer_keys: dict, stop: threading.Event) -> None:
        from .integrity import tensor_spans

        spans = {}
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        for i in range(len(self.layers)):
            while i >= READ_AHEAD and not self._ready[i - READ_AHEAD].wait(0.05):
                if stop.is_set() or self._loading_ended.is_set():
                    return
            ranges: dict[Path, list[tuple[int, int]]] = {}
            for path, key in layer_keys[i].values():
                if path not in spans:
                    spans[path] = tensor_spans(path)
                ranges.setdefault(path, []).append(spans[path][key])
            for path, parts in ranges.items():
                fd = os.open(path, os.O_RDONLY)
                try:
                    for start, end in _merged(parts):
                        while start < end:
                            if stop.is_set():
                                return
                            n = os.preadv(fd, [view[: min(READ_CHUNK, end - start)]], start)
                            if n <= 0:
                                break
                            start += n
                finally:
                    os.close(fd)
            self._read[i].set()

    def _load(self, layer_keys: dict, stop: threading.Event) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(pretrained_model_name_or_path=str(self.folder), device_map={"": self.device},
                                     dtype=None, weight_mapping=self.mapping)
        from .integrity import nonfinite_input

        try:
            for i in range(len(self.layers)):
                while not self._read[i].wait(0.05):
                    if stop.is_set() or self._reading_ended.is_set():
                        break  # a failed read ahead: the loading reads the files itself
                if stop.is_set():
                    raise InterruptedError("layer loading stopped")
                self._load_layer(i, layer_keys[i], convert_and_load_state_dict_in_model, config)
            bad = _first_nonfinite_stored(self.beyond) if self.check_values and self.beyond else None
            if bad is not None:
                raise nonfinite_input(bad, self.folder)
            if self.on_done is not None:
                self.on_done()
        finally:
            self._loading_ended.set()
            sys.setswitchinterval(self._switch)

    def _load_layer(self, i: int, keys: dict, convert_and_load_state_dict_in_model, config) -> None:
        slices = _Slices(keys)
        shell = _Shell(self.config, self.base_model_prefix, self.layers_path, i, self.layers[i])
        try:
            with _quiet_transformers():
                info, _ = convert_and_load_state_dict_in_model(shell, slices, config)
        finally:
            slices.close()
        self._check_layer(i, info, shell, keys)
        self._ready[i].set()

    def _check_layer(self, i: int, info, shell: nn.Module, keys: dict) -> None:
        missing = sorted(info.missing_keys)  # the shell holds layer i only
        mismatched = sorted(k[0] if isinstance(k, tuple) else k for k in info.mismatched_keys)
        errors = list(getattr(info, "conversion_errors", {}) or {}) + list(getattr(info, "error_msgs", []) or [])
        if missing or mismatched or errors:
            what = (f"'{missing[0]}' is missing" if missing else f"'{mismatched[0]}' has the wrong shape" if mismatched
                    else f"{errors[0]} could not be converted")
            raise MoECompressError(f"cannot load decoder layer {i} of '{self.folder}': {what}; "
                                   "pass a complete checkpoint of this model")
        if self.check_values:
            from .integrity import first_nonfinite_tensor, nonfinite_input

            bad = first_nonfinite_tensor(shell.state_dict())
            if bad is None and info.unexpected_keys:  # tensors transformers did not load: their stored values
                bad = _first_nonfinite_stored(keys)
            if bad is not None:
                raise nonfinite_input(bad, self.folder)


def _merged(parts: list[tuple[int, int]], gap: int = 1 << 20) -> list[tuple[int, int]]:
    """Byte ranges sorted and joined where less than ``gap`` apart."""
    out: list[list[int]] = []
    for start, end in sorted(parts):
        if out and start - out[-1][1] < gap:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def _first_nonfinite_stored(entries: dict[str, tuple[Path, str]]) -> str | None:
    from .integrity import first_nonfinite_tensor

    slices = _Slices(entries)
    try:
        for key, sl in sorted(slices.items()):
            if first_nonfinite_tensor({key: sl[...]}) is not None:
                return key
    finally:
        slices.close()
    return None


class _Shell(nn.Module):
    """A module holding only decoder layer ``i`` of ``model`` at its path (``model.layers.i``),
    with the attributes transformers' loader reads (config, base_model_prefix): the loader finds
    the layer through it whatever the model's list holds at the time, and lists only its keys."""

    def __init__(self, config, base_model_prefix: str, layers_path: str, i: int, layer: nn.Module):
        super().__init__()
        self.config, self.base_model_prefix = config, base_model_prefix
        *parents, last = layers_path.split(".")
        node: nn.Module = self
        for name in parents:
            node.add_module(name, nn.Module())
            node = getattr(node, name)
        node.add_module(last, nn.ModuleDict({str(i): layer}))


_quiet_lock = threading.Lock()
_quiet_state: dict = {"depth": 0, "level": None, "bars": False}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' loading report lists the keys left for later (the layers), and its progress
    bar would be drawn once per layer: neither is the user's concern. Its verbosity is the
    process's, and loader threads enter this beside the main thread: the first to enter saves
    the user's settings and the last to leave puts them back (saved and restored by each, two
    overlapping entries could leave the user's verbosity at ERROR)."""
    from transformers.utils import logging as hf_logging

    with _quiet_lock:
        if _quiet_state["depth"] == 0:
            _quiet_state.update(level=hf_logging.get_verbosity(), bars=hf_logging.is_progress_bar_enabled())
            hf_logging.set_verbosity(logging.ERROR)
            hf_logging.disable_progress_bar()
        _quiet_state["depth"] += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_state["depth"] -= 1
            if _quiet_state["depth"] == 0:
                hf_logging.set_verbosity(_quiet_state["level"])
                if _quiet_state["bars"]:
                    hf_logging.enable_progress_bar()


def load(source, folder: Path, *, dtype, device: str, check_values: bool):
    """``from_pretrained(source)`` whose decoder layers load in the background (module docstring)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from .arch import family_for_config
    from .integrity import first_nonfinite_tensor, nonfinite_input, take_over_scan

    config = AutoConfig.from_pretrained(source)
    spec = family_for_config(config)
    layer_keys, beyond, rest = _keys_by_layer(Path(folder), spec.layers_path,
                                             config.get_text_config().num_hidden_layers)
    if not all(layer_keys.values()):
        return None  # not the layout this model names its layers by: the caller loads it whole
    rest_slices = _Slices(rest)
    try:
        state = {k: s[...] for k, s in rest_slices.items()}
    finally:
        rest_slices.close()
    scanned = None
    if check_values:  # every value is checked here instead of by the file scan (integrity.take_over_scan)
        scanned = take_over_scan(folder)
        bad = first_nonfinite_tensor(state)  # everything outside the layers, as stored (the embeddings run first)
        if bad is not None:
            raise nonfinite_input(bad, folder)
    with _quiet_transformers():
        # given a state dict, transformers takes the config, not the folder (it reads no weight file)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, dtype=dtype,
                                                                          device_map=device, state_dict=state)
    del state
    _loads[model] = LayerLoad(model, spec.layers_path, model.get_submodule(spec.layers_path), layer_keys,
                              Path(folder), torch.device(device), check_values, beyond=beyond, on_done=scanned)
    return model


def finish(model: nn.Module) -> None:
    """Every decoder layer of ``model`` loaded (a no-op for a model loaded whole); raises the
    background load's error. Call before reading weights other than by running layers."""
    load_ = _loads.pop(model, None)
    if load_ is not None:
        load_.finish()


def loading(model: nn.Module) -> bool:
    """Whether ``model``'s layers are still being loaded in the background."""
    return model in _loads
