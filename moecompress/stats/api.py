"""``moecompress stats`` as a library call: checkpoint + calibration source -> saved Stats."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MoECompressError
from ..options import StatsOptions, library_function
from . import collect_stats
from .container import Stats, summary_path


@library_function(StatsOptions)
def stats_for_checkpoint(model: str | os.PathLike, output: str | os.PathLike | None = None, *, opts: StatsOptions,
                         progress: bool = True) -> Stats:
    """Load ``model``, draw calibration tokens from ``calib`` and collect routing statistics;
    save them to ``output`` (safetensors + JSON summary) when given.

    ``max_gpu_memory`` / ``max_cpu_memory`` stream the model layer by layer under those caps
    (see ``checkpoint.load_model``); the statistics equal the in-memory ones up to float rounding.
    ``batch_size`` None: 8 sequences on the CPU or streamed; on a GPU as many as make ~16k tokens
    (:func:`default_batch_size`). ``dtype="auto"`` computes in float32 on the CPU
    (``checkpoint.compute_dtype``).
    """
    from ..calibration import load_calibration
    from ..checkpoint import compute_dtype, load_model
    from ..device import place
    from ..source import open_source

    if output is not None:
        output = Path(output)
        if output.suffix != ".safetensors":
            raise MoECompressError(f"output '{output}' must end in .safetensors (a JSON summary is written beside it)")
        existing = next((f for f in (output, summary_path(output)) if f.exists()), None)
        if existing is not None and not opts.overwrite:
            raise MoECompressError(f"'{existing}' already exists; pass --overwrite to replace it")
        if output.parent.exists() and not output.parent.is_dir():
            raise MoECompressError(f"cannot write into '{output.parent}': not a folder")
        from ..outputs import check_output_file

        check_output_file(output, source=model)  # never into the input checkpoint
    if opts.streamed and opts.device not in (None, "auto", "cuda", "cuda:0"):
        raise MoECompressError("--max-gpu-memory / --max-cpu-memory stream onto the first GPU (or the CPU without "
                               "one); leave --device out or pass --device cuda")
    source = open_source(model)  # a clear error for missing / non-MoE models before reading any weights
    opts = place(opts, source.config)  # --device auto
    streamed = opts.streamed
    batch_size = opts.resolved_batch_size(opts.device, streamed)
    tokens = load_calibration(source.tokenizer(), opts.calib, **opts.calibration())
    lm = load_model(source, dtype=compute_dtype(opts.dtype, opts.device, streamed=streamed),
                    device=None if streamed else opts.device, max_gpu_memory=opts.max_gpu_memory,
                    max_cpu_memory=opts.max_cpu_memory)
    stats = collect_stats(lm, tokens, batch_size=batch_size, segment_len=opts.segment_len, progress=progress,
                          meta={"model": str(model), "calib": str(opts.calib), "mode": opts.mode, "field": opts.field,
                                "seed": opts.seed, "dtype": str(next(lm.parameters()).dtype).replace("torch.", "")})
    if output is not None:
        stats.save(output)
    return stats


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def default_batch_size(seq_len: int, n: int, *, on_gpu: bool) -> int:
    """Sequences per forward pass when the user gives none.

    On a GPU a batch of 8 x 512 tokens leaves the forward bound by kernel-launch overhead for
    models with few active parameters (OLMoE-1B-7B, Qwen3-30B-A3B on an H100: see
    docs/benchmarks.md), and every MoE layer adds the statistics' own launches; ~16k tokens per
    batch keeps the GPU busy. On the CPU larger batches gain nothing and cost memory.
    """
    if not on_gpu:
        return 8
    return max(1, min(n, max(8, 16384 // max(seq_len, 1))))


def plot_usage(stats: Stats, path: str | os.PathLike, stat: str = "count") -> Path:
    """Per-layer expert-usage heatmap (share of each layer's ``stat`` per expert) as PNG."""
    from ..plotting import pyplot, save_png

    plt = pyplot()
    layers = stats.layers
    rows = []
    for li in layers:
        v = stats.get(li, stat).double()
        rows.append((v / v.sum().clamp_min(1e-300)).numpy())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * len(rows[0]) + 2), max(2.0, 0.35 * len(layers) + 1.2)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(len(layers)), [str(li) for li in layers])
    title = stats.meta.get("model", "")
    ax.set_title(f"{Path(str(title)).name or title}: share of top-k {stat} per expert", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of layer")
    fig.tight_layout()
    path = save_png(fig, path)
    return path


