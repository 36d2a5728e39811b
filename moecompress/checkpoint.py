"""Reading and writing Hugging Face checkpoints safely.

* ``load_model`` accepts a local folder or a Hub id (local folders never touch the network).
* ``output_folder`` writes into a hidden temporary sibling of the output and renames it into
  place only when everything succeeded, so a failed run leaves nothing half-written and the
  input is never modified.
* ``save_model`` relies on transformers' ``save_pretrained``, which reverts the fused 3-D
  expert tensors to the per-expert key names of the published checkpoints (what vLLM loads).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import weakref
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Iterator

import torch

from . import __version__
from .errors import MoECompressError
from .guards import check_device, load_error, load_policy, loading_policy, trust_remote_code
from .source import (RECORD_FILE, Source, first_line as _first_line, load_config, load_record,  # noqa: F401
                     open_source, resolve_source, source_folder, stored_dtype)

# Tokenizer and processor files copied verbatim (byte-exact, no re-serialisation).
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.json", "chat_template.jinja",
    "tiktoken.model", "o200k_base.tiktoken",
)
_DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise MoECompressError(f"unknown dtype '{name}'; use one of: {', '.join(_DTYPES)}") from None


def compute_dtype(dtype: str | torch.dtype, device: str | None = None, *, streamed: bool = False):
    """The dtype a stage computes in. ``auto`` is float32 when the computation runs on the CPU
    (bf16 matmuls there made the same prune 4-7x slower, 393-410 s vs 58-104 s, and are less
    exact) and the checkpoint's own dtype on a GPU. Outputs always keep the checkpoint's dtype."""
    if not isinstance(dtype, str) or dtype != "auto":
        return dtype
    on_cpu = (device is None or str(device) == "cpu") and not (streamed and torch.cuda.is_available())
    return "float32" if on_cpu else "auto"


def parse_memory(text: str | None) -> int | None:
    """'4GiB', '512MiB', '8GB', '2e9' -> bytes (None stays None)."""
    if text is None:
        return None
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    t = str(text).strip().lower()
    for u, mult in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * mult)
            except ValueError:
                break
    try:
        return int(float(t))
    except ValueError:
        raise MoECompressError(f"cannot read memory size '{text}'; write it like 4GiB, 512MiB or 8GB") from None


def load_model(
    src: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    *,
    max_gpu_memory: str | None = None,
    max_cpu_memory: str | None = None,
    offload_folder: str | os.PathLike | None = None,
    gpu_working_bytes: int = 0,
    trust_remote_code: bool | None = None,
    allow_nonfinite: bool | None = None,
    layer_ahead: bool = False,
):
    """Load a causal LM for compression (eval mode, no grad needed).

    The input is checked (``integrity.require_sound_input``: every shard complete first, and no
    NaN/Inf unless ``allow_nonfinite``, scanned while the weights load and known before this
    returns); ``trust_remote_code`` / ``allow_nonfinite`` left None
    follow the current ``guards.loading_policy`` (the CLI's ``--trust-remote-code`` /
    ``--allow-nonfinite``).

    With ``max_gpu_memory`` (and/or ``max_cpu_memory``) the model is streamed: accelerate
    places what fits on the GPU under the cap, the rest on the CPU and then on disk
    (``offload_folder``), and onloads each layer's weights only while that layer runs, the
    way llm-compressor's sequential pipeline onloads. Forward results equal the in-memory
    model's; memory stays under the caps. ``gpu_working_bytes`` is what the stage itself holds
    on the GPU besides activations (e.g. merging: an onloaded original and merged layer and the
    re-fit's accumulators); it is taken from the weights' share of the cap.

    ``layer_ahead``: where it applies (``layerload.eligible``: in GPU memory, an unquantized
    local safetensors checkpoint), the decoder layers load in a background thread while the
    caller computes on the first ones; each layer's forward waits for its weights, and the caller
    calls ``layerload.finish(model)`` before reading weights any other way.
    """
    changes = {k: v for k, v in (("trust_remote_code", trust_remote_code), ("allow_nonfinite", allow_nonfinite))
               if v is not None}
    with loading_policy(**changes):
        return _load_model(src, dtype, device, max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory,
                           offload_folder=offload_folder, gpu_working_bytes=gpu_working_bytes, layer_ahead=layer_ahead)


def _load_model(src, dtype, device, *, max_gpu_memory, max_cpu_memory, offload_folder, gpu_working_bytes,
                layer_ahead=False):
    from transformers import AutoModelForCausalLM

    from . import layerload
    from .arch import family_for_config, meta_view
    from .formats import dequantized_loading, partial_fp8_blocks
    from .integrity import require_sound_input

    if isinstance(device, str):
        check_device(device)
    config = load_config(src)
    family_for_config(config)  # refuse non-MoE / unknown families before loading weights
    source = resolve_source(src)
    folder = source_folder(src)
    # shards checked now; the NaN/Inf scan reads the files while from_pretrained does (below)
    require_sound_input(folder, allow_nonfinite=load_policy().allow_nonfinite, wait=False)
    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    # Quantized checkpoints (FP8 blocks, MXFP4) compute dequantized: see formats.py.
    quantized = dequantized_loading(config)
    kwargs: dict = {"device_map": device}
    streamed = max_gpu_memory is not None or max_cpu_memory is not None
    if layer_ahead and layerload.eligible(folder, device, quantized, streamed, trust_remote_code()):
        try:
            model = layerload.load(source, folder, dtype=dt, device=device or "cpu",
                                   check_values=not load_policy().allow_nonfinite)
        except (OSError, ValueError) as e:
            raise MoECompressError(load_error("cannot load", src, e)) from None
        if model is not None:  # each layer's values are checked as it loads (the file scan is taken over)
            model.eval()
            model.requires_grad_(False)
            return model
    if streamed:
        max_memory: dict = {}
        if torch.cuda.is_available():
            total = _gpu_memory()
            gpu = parse_memory(max_gpu_memory) if max_gpu_memory else total
            if total is not None and gpu > total:  # accelerate would place more than the GPU holds: out of memory later
                raise MoECompressError(f"--max-gpu-memory {max_gpu_memory} is more than the GPU's memory "
                                       f"({total / 2**30:.1f} GiB); give at most {int(total / 2**30)}GiB")
            # accelerate budgets weights only; keep 30% of the cap for activations and the
            # observers' workspace (measured: stats peak 3.24-3.68 GiB under 4 GiB on the
            # OLMoE-1B-7B shape), plus the stage's own working set, so that the *peak* stays
            # under the cap. Of the weights' share accelerate keeps room for the largest
            # decoder layer (the one onloaded at a time) and places the modules in order from
            # the input embeddings; if the embeddings do not fit beside that room, no weight
            # lands on the GPU, accelerate makes the CPU the execution device and the whole run
            # computes there (measured: the Qwen3-30B-A3B shape under 4 GiB, GPU idle for
            # 9 minutes, docs/benchmarks.md "Session 12"), so refuse instead.
            weights = int(gpu * (1 - ACTIVATION_SHARE)) - int(gpu_working_bytes)
            shapes = meta_view(config)  # one weightless model for both sizes
            layer = largest_layer_bytes(config, dt if isinstance(dt, torch.dtype) else None, view=shapes)
            first = first_module_bytes(config, dt if isinstance(dt, torch.dtype) else None, view=shapes)
            if weights < layer * 1.1 + first:
                need = (layer * 1.1 + first + gpu_working_bytes) / (1 - ACTIVATION_SHARE)
                raise MoECompressError(
                    f"--max-gpu-memory {max_gpu_memory or '(the whole GPU)'} is too small: one decoder layer takes "
                    f"{layer / 2**30:.2f} GiB on the GPU while it runs, the input embeddings {first / 2**30:.2f} GiB"
                    + (f", this stage {gpu_working_bytes / 2**30:.2f} GiB besides" if gpu_working_bytes else "")
                    + f", and 30% stays for activations; give at least {math.ceil(need / 2**28) / 4:g}GiB")
            max_memory[0] = weights
        max_memory["cpu"] = _cpu_cap(max_cpu_memory) if max_cpu_memory else _available_cpu_memory()
        own_folder = offload_folder is None
        if own_folder:
            offload_folder = tempfile.mkdtemp(prefix="moecompress-offload-")
        # found mid-load, a full disk costs the load's time and the message is the OS's
        offload = offloaded_bytes(config, dtype, max_memory)
        if offload:
            where = Path(offload_folder).absolute()
            while not where.exists() and where != where.parent:  # a folder given may not exist yet
                where = where.parent
            try:
                require_free_space(where, offload, "offloading the weights beyond the memory caps",
                                   "free space there, set TMPDIR to a larger disk, or raise --max-cpu-memory")
            except MoECompressError:
                if own_folder:
                    shutil.rmtree(offload_folder, ignore_errors=True)
                raise
        kwargs = {"device_map": "auto", "max_memory": max_memory, "offload_folder": str(offload_folder)}
    try:
        with partial_fp8_blocks(config):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, trust_remote_code=trust_remote_code(),
                                                         **kwargs, **quantized)
    except (OSError, ValueError) as e:
        if kwargs.get("offload_folder") and own_folder:
            shutil.rmtree(kwargs["offload_folder"], ignore_errors=True)
        raise MoECompressError(load_error("cannot load", src, e)) from None
    if kwargs.get("offload_folder") and own_folder:
        # the offloaded weights live as long as the model: delete them with it
        weakref.finalize(model, shutil.rmtree, kwargs["offload_folder"], True)
    if "max_memory" in kwargs and 0 in kwargs["max_memory"]:
        _require_gpu_execution(model, kwargs, own_folder)
    require_sound_input(source_folder(src), allow_nonfinite=load_policy().allow_nonfinite)  # before any weight is used
    model.eval()
    model.requires_grad_(False)
    if isinstance(dt, torch.dtype) and "max_memory" not in kwargs:
        cast_floating_weights(model, dt)
    if quantized:
        _forget_dequantizing(model)
    _align_cpu_weights(model)
    return model


def _forget_dequantizing(model) -> None:
    """A model loaded dequantized (FP8 blocks, MXFP4: ``formats.dequantized_loading``) holds plain
    weights: it saves as a plain model of its family. Why: ``from_pretrained`` records the
    conversions it loaded with (``_weight_conversions``), the dequantizing ones included, and
    ``save_pretrained`` reverses them. transformers 5.17 cannot reverse those ("Undefined Operation
    encountered!", after a whole merge or fine-grained prune); without the record it reverses
    the family's own conversions, what 5.24 does for such a model."""
    if getattr(model, "_weight_conversions", None) is not None:
        model._weight_conversions = None


def cast_floating_weights(model, dtype: torch.dtype) -> None:
    """Floating weights that did not come out in the asked ``dtype``, cast to it. Why: a
    compressed-tensors checkpoint's fused 3-D experts are decompressed by transformers in the
    dtype of their scales (the checkpoint's, bf16) whatever dtype was asked, and on a GPU a
    float32 activation times a bf16 expert weight is an error (measured on transformers 5.17 and
    5.24). Integer tensors (packed weights) are left alone; a streamed model is not touched
    (its weights live in accelerate's offload)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype:
                module._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)


# Share of a streamed run's GPU cap kept for activations and the observers' workspace (the
# weights get the rest, less the stage's own working set): see _load_model.
ACTIVATION_SHARE = 0.3
# Bytes per token and per element of a decoder layer's active width (below) at the peak of the
# prune's layer passes, streamed. Measured (docs/benchmarks.md, "Session 11"): about 140 KB per
# token on the OLMoE-1B-7B shape (active width 32,768, so 4.3 bytes; GPU peak 2.56, 3.26, 4.39,
# 6.53 GiB at 8, 16, 32, 64 sequences of 512 tokens under a 4 GiB cap) and about 131 KB on the
# Qwen3-30B-A3B shape (width 27,778, 4.7 bytes; 5.57 GiB at 27 sequences under 6 GiB). 6 leaves
# a margin of 1.3-1.4x on both, for the shapes not measured.
_BYTES_PER_ACTIVE_ELEMENT = 6


def activation_bytes_per_token(config) -> int:
    """A streamed layer pass's GPU bytes per calibration token: the widest decoder layer's
    active width (its parameters that one token uses, over the hidden size: attention, the
    top-k routed experts, shared experts, or a dense MLP) times ``_BYTES_PER_ACTIVE_ELEMENT``."""
    import operator

    from .arch import meta_view

    view = meta_view(config)
    routed = {}  # id(parameter) -> share of it one token uses (top_k / E of a fused expert tensor)
    for layer in view:
        for p in layer.expert_parameters().values():
            routed[id(p)] = layer.top_k / layer.num_experts
    hidden = int(view.layers[0].hidden_size) if view.layers else int(config.hidden_size)
    widest = 0.0
    for dec in operator.attrgetter(view.spec.layers_path)(view.model):
        active = sum(p.numel() * routed.get(id(p), 1.0) for p in dec.parameters())
        widest = max(widest, active / hidden)
    return int(widest * _BYTES_PER_ACTIVE_ELEMENT)


def streamed_batch_size(config, max_gpu_memory: str | None, seq_len: int, n: int) -> int:
    """Sequences per batch for a model streamed onto the GPU: as many as the cap's activation
    share (``ACTIVATION_SHARE``) holds at ``activation_bytes_per_token``, 1 to ``n``. The cap is
    ``max_gpu_memory``, or the GPU's memory without one, as in ``load_model``."""
    cap = parse_memory(max_gpu_memory) if max_gpu_memory else _gpu_memory()
    per_sequence = activation_bytes_per_token(config) * max(seq_len, 1)
    return max(1, min(n, int(cap * ACTIVATION_SHARE) // max(per_sequence, 1)))


def largest_block_bytes(view, config, dtype: str | torch.dtype | None = None) -> int:
    """Bytes of the largest MoE block of ``view`` (a :func:`arch.meta_view` of ``config``) in
    ``dtype`` (a name; "auto" or None: the checkpoint's): what a stage that builds a new block
    beside a streamed model's weights holds on the GPU (keep / E of it for a pruned or merged one)."""
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else parse_dtype(dtype)
    size = (dtype or stored_dtype(config) or torch.float32).itemsize
    return max(sum(p.numel() for p in layer.block.parameters()) for layer in view) * size


def _require_gpu_execution(model, kwargs: dict, own_folder: bool) -> None:
    """A model streamed onto the GPU must compute there. accelerate makes the CPU the execution
    device when no weight at all was placed on the GPU; the check before loading predicts that
    from the embeddings' size, and this catches any placement it did not predict."""
    from .capture import execution_device

    if execution_device(model).type == "cuda":
        return
    if own_folder:
        shutil.rmtree(kwargs["offload_folder"], ignore_errors=True)
    raise MoECompressError("the GPU cap left no weight on the GPU, so the model would compute on the CPU; "
                           "give a larger --max-gpu-memory")


def first_module_bytes(config, dtype: torch.dtype | None = None, view=None) -> int:
    """Bytes of the input embeddings in ``dtype`` (default: the checkpoint's), with an output
    head tied to them: the first weights accelerate places, which must fit on the GPU beside
    the room for one decoder layer for the GPU to be the execution device."""
    from .arch import meta_view

    model = (view or meta_view(config)).model
    size = (dtype or stored_dtype(config) or torch.float32).itemsize
    embed = model.get_input_embeddings().weight
    tied = getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    return embed.numel() * size * (2 if tied else 1)


def largest_layer_bytes(config, dtype: torch.dtype | None = None, view=None) -> int:
    """Bytes of the largest decoder layer's weights in ``dtype`` (default: the checkpoint's):
    what a streamed model onloads at once, and accelerate keeps room for on the GPU."""
    import operator

    from .arch import meta_view

    view = view or meta_view(config)
    size = (dtype or stored_dtype(config) or torch.float32).itemsize
    layers = operator.attrgetter(view.spec.layers_path)(view.model)
    return max(sum(p.numel() for p in layer.parameters()) for layer in layers) * size


# CPU matrix kernels take different paths (and round differently) for operands at different
# memory alignments. Weights loaded from safetensors are views into the file at arbitrary
# 8-byte offsets, and a streamed model onloads them from wherever its offload keeps them, so the
# same weights would give slightly different results in memory and streamed. Both paths get
# 64-byte-aligned weights instead (torch's CPU allocator aligns to 64 bytes).
_ALIGN = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a 64-byte-aligned copy of it if it is an unaligned CPU tensor."""
    return t.clone() if t.device.type == "cpu" and t.data_ptr() % _ALIGN else t


class _AlignedWeights(Mapping):
    """An accelerate hook's ``weights_map`` whose CPU tensors come back 64-byte aligned."""

    def __init__(self, inner):
        self.inner = inner

    def __getitem__(self, key):
        return aligned(self.inner[key])

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)


def _align_cpu_weights(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.device.type == "cpu" and p.data_ptr() % _ALIGN:
                    p.data = p.data.clone()
            hook = getattr(module, "_hf_hook", None)
            for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
                weights = getattr(h, "weights_map", None)
                if weights is not None and not isinstance(weights, _AlignedWeights):
                    h.weights_map = _AlignedWeights(weights)


def require_free_space(folder: Path, need: int, what: str,
                       advice: str = "free space there or choose another output folder") -> None:
    """Refuse, before the work starts, an output whose ``need`` bytes (plus 1% and 16 MiB for
    headers, config, tokenizer and card) do not fit in the free space of the file system of
    ``folder`` (where it is written): found at the end of a long run, a full disk costs the
    user the whole run. The message names the file system's mount point (``folder`` itself is
    a temporary folder the user never chose) and ends with ``advice``."""
    free = shutil.disk_usage(folder).free
    if free < need * 1.01 + (16 << 20):
        mount = Path(folder).resolve()
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        raise MoECompressError(f"{what} needs about {need / 1e9:.2f} GB and the file system at {mount} has "
                               f"{free / 1e9:.2f} GB free; {advice}")


def offloaded_bytes(config, dtype: str | torch.dtype, max_memory: dict) -> int:
    """Weight bytes that cannot stay within ``max_memory`` (accelerate's caps: GPU 0 and the CPU)
    and go to the offload folder: at least the model's weights in the compute ``dtype`` beyond
    the caps (``device.model_bytes``: a quantized checkpoint loads dequantized; accelerate places
    whole modules, so it may offload a little more)."""
    from .device import model_bytes

    return max(0, model_bytes(config, dtype) - sum(max_memory.values()))


def _gpu_memory() -> int | None:
    """The first GPU's memory in bytes (None where torch cannot tell)."""
    try:
        return torch.cuda.get_device_properties(0).total_memory
    except (RuntimeError, AssertionError):
        return None


def _cpu_cap(max_cpu_memory: str) -> int:
    """``--max-cpu-memory`` in bytes; refused above the machine's memory, where accelerate would
    keep more weights in memory than there is and the system would kill the run without a word."""
    cap = parse_memory(max_cpu_memory)
    try:
        import psutil

        total = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return cap
    if cap > total:
        raise MoECompressError(f"--max-cpu-memory {max_cpu_memory} is more than this machine's memory "
                               f"({total / 2**30:.1f} GiB); give at most {int(total * 0.8 / 2**30)}GiB")
    return cap


def _available_cpu_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available * 0.8)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return 8 * 2**30


@contextlib.contextmanager
def output_folder(out: str | os.PathLike, *, overwrite: bool = False, source: str | os.PathLike | None = None,
                  check: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block succeeds.

    Refuses (before any work) an ``out`` that is the source checkpoint, inside it or contains
    it; an existing ``out`` without ``overwrite``, and with it anything but an empty folder or
    a previous moecompress output; an unwritable parent; an unsound input (``integrity``).
    Temporary folders that killed runs left beside ``out`` are removed (``outputs``).

    With ``check`` the written checkpoint must pass ``check.require_valid`` first (every tensor
    the config implies, nothing else, no NaN/Inf); if it fails nothing becomes ``out`` and the
    error names the first bad tensor.
    """
    from .integrity import require_sound_input
    from .outputs import LockedTemp, check_output_folder, clean_stale, normal_permissions

    out = Path(out).expanduser().absolute()
    location = resolve_source(source) if source is not None else None
    check_output_folder(out, overwrite=overwrite, source=location)
    if location is not None:  # shards now; the NaN/Inf verdict at the latest before the output is committed
        require_sound_input(source_folder(location), allow_nonfinite=load_policy().allow_nonfinite, wait=False)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = LockedTemp(out)
    except OSError as e:
        raise MoECompressError(f"cannot write to '{parent}': {e.strerror or e}; choose a writable output folder") from None
    try:
        yield tmp.path
        if location is not None:
            require_sound_input(source_folder(location), allow_nonfinite=load_policy().allow_nonfinite)
        if check:
            from .check import require_valid

            # an input let through with --allow-nonfinite gives an output with NaN/Inf too
            require_valid(tmp.path, written=True, values=not load_policy().allow_nonfinite)
        normal_permissions(tmp.path)
        tmp.commit()
    except BaseException:
        tmp.discard()
        raise


def versions() -> dict[str, str]:
    import transformers

    return {"moecompress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def save_model(model, folder: Path, *, source: str | os.PathLike | None = None, record: dict[str, Any] | None = None,
               max_shard_size: str = "5GB") -> None:
    """Save weights (sharded safetensors), config, generation config, tokenizer files and the record."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if source is not None:
        copy_tokenizer(source, folder)
    if record is not None:
        write_record(folder, record, source)


def copy_tokenizer(source: str | os.PathLike, folder: Path) -> None:
    src = source_folder(source)
    if src is not None:
        for name in _TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copyfile(src / name, folder / name)
        return
    with contextlib.suppress(Exception):  # Hub id without a local snapshot: best effort
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code()).save_pretrained(folder)


def write_record(folder: Path, record: dict[str, Any], source: str | os.PathLike | None = None) -> dict:
    """Write ``moecompress.json``: this stage's record plus the history of earlier stages.

    No timestamps: the same inputs and seed must give the same bytes.
    """
    history = []
    if source is not None:
        prev = load_record(source)
        if prev:
            history = prev.get("history", []) + [{k: v for k, v in prev.items() if k != "history"}]
    full = {**record, "source": str(source) if source is not None else None, "versions": versions(), "history": history}
    (folder / RECORD_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=_json_default) + "\n")
    return full


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
