"""``moecompress merge MODEL -o OUT --keep N``: merge each MoE layer's experts into N."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..options import MergeOptions, cli_command
from ._common import console, one_stage, user_errors, write_json


def _table(result) -> Table:
    t = Table(title="merged experts per MoE layer (merge error: relative routed-output error before the re-fit)")
    for col in ("layer", "merged experts", "largest cluster", "kept alone", "merge error", "clusters (original experts)"):
        t.add_column(col, justify="left" if col.startswith("clusters") else "right")
    for li, groups in result.clusters.items():
        err = result.merge_error.get(li)
        shown = " ".join("{" + ",".join(map(str, g)) + "}" for g in groups if len(g) > 1)
        t.add_row(str(li), str(len(groups)), str(max(len(g) for g in groups)), str(sum(len(g) == 1 for g in groups)),
                  "-" if err is None else f"{err:.3f}", shown if len(shown) <= 80 else shown[:77] + "...")
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    @cli_command(MergeOptions)
    def merge(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the merged checkpoint."),
        opts: MergeOptions = None,
    ) -> None:
        """Merge experts (M-SMoE, HC-SMoE or averaging) into a smaller checkpoint that loads in stock transformers."""

        with user_errors():
            result = one_stage("merge", model, output, opts, progress=True)
        console.print(f"{result.method}, {result.num_experts} -> {result.keep} experts per MoE layer", highlight=False)
        console.print(_table(result))
        write_json(opts.json_out, result.to_dict(with_time=False))
        console.print(f"wrote {output} ({result.seconds:.1f} s)", highlight=False)
