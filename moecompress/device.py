"""``--device auto`` (the default): where a command computes.

The GPU when there is one; if the model's weights (in the compute dtype) do not fit in the
share of it that ``load_model`` gives weights (70%, the rest is for activations), the model
is streamed under a cap of the whole GPU, as ``--max-gpu-memory`` does; the CPU without a GPU.
One line says what was chosen. ``choose_device`` is a pure function of the config and the
GPU's size, so the decision is tested without a GPU.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

WEIGHTS_SHARE = 0.7  # of the GPU, for weights (checkpoint.load_model keeps 30% for activations)


@dataclass(frozen=True)
class DeviceChoice:
    device: str | None  # for load_model: None = the CPU, or streamed when max_gpu_memory is set
    max_gpu_memory: str | None
    line: str

    @property
    def streamed(self) -> bool:
        return self.max_gpu_memory is not None


def model_bytes(config, dtype: str | torch.dtype = "auto") -> int:
    """Bytes of the model's weights in the compute ``dtype`` (auto: the checkpoint's; a
    quantized checkpoint computes dequantized, in bf16)."""
    from .checkpoint import parse_dtype, stored_dtype
    from .formats import quant_method
    from .surgery import meta_view

    dt = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dt, torch.dtype):
        dt = torch.bfloat16 if quant_method(config) else (stored_dtype(config) or torch.float32)
    plain = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    return sum(p.numel() for p in meta_view(plain).model.parameters()) * dt.itemsize


def choose_device(config, device: str | None, dtype: str | torch.dtype = "auto", max_gpu_memory: str | None = None,
                  max_cpu_memory: str | None = None, *, gpu_bytes: int | None = None, gpu_name: str = "GPU",
                  can_stream: bool = True) -> DeviceChoice:
    """What ``--device`` (None or "auto" = choose) means for this model on this machine.
    ``gpu_bytes`` is the first GPU's memory (default: asked from torch; 0 = no GPU)."""
    if device not in (None, "auto"):
        return DeviceChoice(device, max_gpu_memory, f"device: {device} (as given)")
    if max_gpu_memory is not None or max_cpu_memory is not None:
        return DeviceChoice(None, max_gpu_memory, f"device: streamed under --max-gpu-memory {max_gpu_memory}"
                            if max_gpu_memory else "device: streamed under --max-cpu-memory")
    if gpu_bytes is None:
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 0
        gpu_name = torch.cuda.get_device_name(0) if gpu_bytes else gpu_name
    if not gpu_bytes:
        return DeviceChoice(None, None, "device: cpu (no GPU)")
    need, gib = model_bytes(config, dtype), 2**30
    what = f"the model's weights ({need / gib:.1f} GiB)"
    if need <= WEIGHTS_SHARE * gpu_bytes:
        return DeviceChoice("cuda", None, f"device: cuda ({gpu_name}, {gpu_bytes / gib:.0f} GiB): {what} fit")
    if not can_stream:
        return DeviceChoice(None, None, f"device: cpu: {what} do not fit the {gpu_name} ({gpu_bytes / gib:.0f} GiB) "
                                        "and this stage does not stream")
    cap = f"{math.floor(gpu_bytes * 0.95 / gib)}GiB"
    return DeviceChoice(None, cap, f"device: cuda, streamed: {what} do not fit {WEIGHTS_SHARE:.0%} of the {gpu_name} "
                                   f"({gpu_bytes / gib:.0f} GiB); layers are onloaded one at a time "
                                   f"(as --max-gpu-memory {cap})")


def resolve_device(config, device: str | None, dtype: str | torch.dtype = "auto", max_gpu_memory: str | None = None,
                   max_cpu_memory: str | None = None, *, can_stream: bool = True) -> DeviceChoice:
    """:func:`choose_device` for this machine; says the choice in one line on stderr when there
    was one to make (a GPU is present, or ``auto`` was asked for)."""
    choice = choose_device(config, device, dtype, max_gpu_memory, max_cpu_memory, can_stream=can_stream)
    if device in (None, "auto") and (device == "auto" or torch.cuda.is_available()):
        print(choice.line, file=sys.stderr, flush=True)
    return choice


def place(opts, config, *, can_stream: bool = True):
    """``opts`` (a stage's options with the loading and streaming groups) with ``device`` and
    ``max_gpu_memory`` resolved for this machine (:func:`resolve_device`): what the stage runs
    with, and records."""
    choice = resolve_device(config, opts.device, opts.dtype, getattr(opts, "max_gpu_memory", None),
                            getattr(opts, "max_cpu_memory", None), can_stream=can_stream)
    update = {"device": choice.device}
    if hasattr(opts, "max_gpu_memory"):
        update["max_gpu_memory"] = choice.max_gpu_memory
    return opts.model_copy(update=update)
