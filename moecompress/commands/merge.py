"""``moecompress merge MODEL -o OUT --keep N``: merge each MoE layer's experts into N."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import MergeOptions, cli_command
from ._common import console, fitted_tables, one_stage, user_errors, write_json


def _table(result) -> list:
    heads = ["layer", "merged experts", "largest cluster", "kept alone", "merge error", "clusters (original experts)"]
    rows = []
    for li, groups in result.clusters.items():
        err = result.merge_error.get(li)
        shown = " ".join("{" + ",".join(map(str, g)) + "}" for g in groups if len(g) > 1)
        rows.append([str(li), str(len(groups)), str(max(len(g) for g in groups)), str(sum(len(g) == 1 for g in groups)),
                     "-" if err is None else f"{err:.3f}", shown if len(shown) <= 80 else shown[:77] + "..."])
    return fitted_tables("merged experts per MoE layer (merge error: relative routed-output error before the re-fit)",
                         heads, rows, right=[True] * 5 + [False], text=5)


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
        write_json(opts.json_out, result.to_dict(with_time=False))
        show_result(result, model, output)


def show_result(result, model, output, *, wrote: bool = True) -> None:
    """What `merge` prints for ``result``; ``run`` prints it for its merge stages with ``wrote=False``."""
    console.print(f"{result.method}, {result.num_experts} -> {result.keep} experts per MoE layer", highlight=False)
    console.print(*_table(result))
    console.print(f"{f'wrote {output} ' if wrote else ''}({result.seconds:.1f} s)", highlight=False)
