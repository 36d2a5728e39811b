"""`moecompress check`: does a checkpoint hold exactly what its config implies?"""

from __future__ import annotations

from typing import Optional

import typer

from ._common import console, err_console, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    def check(
        model: str = typer.Argument(..., help="Checkpoint folder to check."),
        no_values: bool = typer.Option(False, "--no-values", help="Skip the NaN/Inf scan (headers only)."),
        device: Optional[str] = typer.Option(None, "--device", help="Where values are scanned (default: the GPU "
                                             "when there is one, else the CPU)."),
        json_out: Optional[str] = typer.Option(None, "--json", help="Write the report as JSON here ('-' = stdout)."),
    ) -> None:
        """Every tensor the config implies is present with the right shape and dtype, nothing else is
        (except MTP layers), the index is consistent, no NaN/Inf, config fields agree. Exit 2 on the first
        problem. Every stage that writes a checkpoint runs this on its output."""
        from ..check import check_checkpoint
        from ..checkpoint import resolve_source
        from ..errors import MoECompressError

        with user_errors():
            if isinstance(resolve_source(model), str):
                raise MoECompressError(f"'{model}' is not a local folder; check takes a checkpoint folder")
            report = check_checkpoint(model, values=not no_values, device=device)
        if json_out is not None:
            write_json(json_out, report.to_dict())
        quiet = json_out is not None and str(json_out) == "-"
        if not report.ok:
            more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
            err_console.print(f"[bold red]check failed:[/] {report.problems[0]}{more}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        if not quiet:
            for note in report.notes:
                console.print(f"note: {note}", highlight=False, soft_wrap=True)
            console.print(f"ok: {report.tensors} tensors ({report.bytes / 2**20:.1f} MiB) match the config"
                          + ("" if no_values else ", no NaN/Inf"), highlight=False)
