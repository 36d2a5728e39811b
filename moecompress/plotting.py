"""Pictures (PNG) the stages write beside their JSON: one place that sets matplotlib up.

matplotlib draws off-screen (the Agg backend: no display on the machines that compress), and
PNGs are written without the ``Software`` stamp so that the same inputs give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MoECompressError

# The pictures a stage leaves in its output folder (the writers use these names), with what the
# model card says under each.
BIT_MAP, REPAIR_TUNING, LOSS_CURVE = "bit_map.png", "repair_tuning.png", "loss_curve.png"
PICTURES = {
    BIT_MAP: "The width of every expert weight, layer by layer (quantize's allocation).",
    REPAIR_TUNING: "Block-wise tuning: each layer's held-out loss per epoch, relative to the closed-form re-fit.",
    LOSS_CURVE: "Distillation: the loss per optimizer step, and the evaluations.",
}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or a one-line error saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoECompressError("drawing the PNG needs matplotlib: pip install matplotlib") from None
    return plt


def save_png(fig, path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (PNG, no version stamp) and close it."""
    plt = pyplot()
    path = Path(path)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return path
