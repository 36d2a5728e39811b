"""``bit_map.png``: the width each expert of each MoE layer was given (mixed-precision allocation)."""

from __future__ import annotations

from pathlib import Path


def width_grid(widths: dict[int, list]) -> tuple[list[int], list, list[list[int]]]:
    """(layers ascending, the widths that occur in order: bits ascending then "fp8", and per
    layer and expert the index of its width in that list)."""
    layers = sorted(widths)
    kinds = sorted({w for ws in widths.values() for w in ws}, key=lambda w: (isinstance(w, str), str(w).zfill(8)))
    code = {w: i for i, w in enumerate(kinds)}
    return layers, kinds, [[code[w] for w in widths[li]] for li in layers]


def plot_bit_map(widths: dict[int, list], path, title: str = "") -> Path:
    """A layers x experts map of ``widths`` (int bits, or "fp8"), one colour per width."""
    from ..plotting import pyplot, save_png

    plt = pyplot()
    layers, kinds, grid = width_grid(widths)
    n = max(len(kinds), 2)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * len(grid[0]) + 2), max(2.0, 0.35 * len(layers) + 1.2)))
    im = ax.imshow(grid, aspect="auto", cmap=plt.get_cmap("viridis", n), vmin=-0.5, vmax=n - 0.5,
                   interpolation="nearest")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("expert")
    ax.set_ylabel("decoder layer")
    ax.set_yticks(range(len(layers)), [str(li) for li in layers])
    bar = fig.colorbar(im, ax=ax, ticks=range(len(kinds)))
    bar.ax.set_yticklabels([w if isinstance(w, str) else f"{w} bits" for w in kinds])
    ax.set_title(title or "expert weight width", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)
