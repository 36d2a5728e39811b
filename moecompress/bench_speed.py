"""Inference speed and memory of a checkpoint: what compression bought in practice.

* prefill: one forward pass over ``batch x prompt_len`` random prompt tokens (KV cache on),
  reported as prompt tokens per second;
* decode: ``gen_len`` greedy steps of one token per sequence reusing the KV cache, reported as
  generated tokens per second (``batch * gen_len / time``);
* memory: on CUDA, the peak of ``torch.cuda.max_memory_allocated`` during the run above what was
  allocated before it (weights excluded); on CPU, the peak resident set size (RSS) during the run
  (the kernel's VmHWM, reset first; sampled where that is unavailable) minus the RSS before it. ``weights_bytes`` is the size of the parameters and buffers.

The best of ``repeats`` timed runs is kept, after one untimed warm-up run.
"""

from __future__ import annotations

import os
import threading
import time

import torch

from .errors import MoECompressError
from .evaluate.perplexity import model_device


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource  # last resort: lifetime peak, an over-estimate of the run's own peak

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: "5" resets the peak resident set size
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _PeakRSS:
    """Peak RSS during a block: the kernel's own counter when it can be reset (no overhead),
    else RSS sampled by a background thread (coarse: it competes for the GIL, so it sleeps 20 ms)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop, self._thread = interval, 0, threading.Event(), None

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        if not (_reset_peak_rss() and _peak_rss_bytes() is not None):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, _peak_rss_bytes() or 0)
        self.peak = max(self.peak, _rss_bytes())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_names(model) -> tuple[str, str]:
    # transformers 5.2x renamed the forward argument and output `past_key_values` to `cache`.
    import inspect

    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params and "past_key_values" not in params else \
        ("past_key_values", "past_key_values")


def _run_once(model, prompt: torch.Tensor, gen_len: int, device: torch.device) -> tuple[float, float]:
    arg, field = _cache_names(model)
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        past = out[field]
        for _ in range(gen_len):
            out = model(input_ids=nxt, use_cache=True, **{arg: past})
            past = out[field]
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def benchmark(model, *, prompt_len: int = 128, gen_len: int = 64, batch: int = 1, repeats: int = 3,
              seed: int = 0) -> dict:
    """Prefill and decode tokens/s and peak memory of a loaded causal LM (see module docstring)."""
    for name, v in (("--prompt-len", prompt_len), ("--batch", batch), ("--repeats", repeats)):
        if v < 1:
            raise MoECompressError(f"{name} must be at least 1 (got {v})")
    if gen_len < 0:
        raise MoECompressError(f"--gen-len must be 0 or more (got {gen_len})")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and prompt_len + gen_len > max_pos:
        raise MoECompressError(f"--prompt-len + --gen-len = {prompt_len + gen_len} exceeds the model's "
                               f"max_position_embeddings ({max_pos}); use shorter lengths")
    device = model_device(model)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    # Random ids above the usual special-token range: speed does not depend on the text.
    prompt = torch.randint(min(10, vocab - 1), vocab, (batch, prompt_len), generator=g).to(device)
    _run_once(model, prompt, min(gen_len, 2), device)  # warm-up: kernels, allocator, lazy init
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        times = [_run_once(model, prompt, gen_len, device) for _ in range(repeats)]
        peak, kind = torch.cuda.max_memory_allocated(device) - before, "cuda_max_allocated"
    else:
        with _PeakRSS() as rss:
            times = [_run_once(model, prompt, gen_len, device) for _ in range(repeats)]
        peak, kind = rss.peak - rss.start, "rss"
    prefill = min(t for t, _ in times)
    decode = min(t for _, t in times)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {
        "prompt_len": prompt_len, "gen_len": gen_len, "batch": batch, "repeats": repeats,
        "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "prefill_tokens_per_s": batch * prompt_len / prefill if prefill > 0 else float("inf"),
        "decode_tokens_per_s": (batch * gen_len / decode if decode > 0 else float("inf")) if gen_len else None,
        "prefill_s": prefill, "decode_s": decode,
        "peak_memory_bytes": max(0, int(peak)), "memory_kind": kind, "weights_bytes": weights,
    }
