"""The loss curve of a distillation run: ``loss_curve.json`` and ``loss_curve.png``."""

from __future__ import annotations

import json
from pathlib import Path

from ..plotting import LOSS_CURVE


def write_curve(folder: Path, state, stages: list[str]) -> None:
    data = {"stages": stages, "steps": state.curve, "eval": state.evals}
    (folder / "loss_curve.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    plot_curve(data, folder / LOSS_CURVE)


def plot_curve(data: dict, path: Path) -> None:
    from ..plotting import pyplot, save_png

    plt = pyplot()
    rows = data["steps"]
    evals = data["eval"]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    if rows:
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss", lw=1)
        if any(r["hidden"] for r in rows):
            ax.plot([r["step"] for r in rows], [r["kl"] for r in rows], label="KL", lw=1)
        starts = [r["step"] for a, r in zip(rows, rows[1:]) if r["stage"] != a["stage"]]
        for s in starts:
            ax.axvline(s - 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distillation loss (nats/token)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("distillation loss" + (f" ({len(data['stages'])} stages)" if len(data["stages"]) > 1 else ""))
    if evals:
        ax2 = axes[0][1]
        names = [k for k in evals[0] if k not in ("step", "stage")]
        for name in names:
            ax2.plot([e["step"] for e in evals], [e[name] for e in evals], marker="o", label=name)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel("validation perplexity")
        ax2.legend()
        ax2.set_title("held-out perplexity")
    fig.tight_layout()
    save_png(fig, path, dpi=100)
