from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import console, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        recipe: Path = typer.Argument(..., help="YAML recipe: model, output, calibration, stages (see recipes/)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
        check: bool = typer.Option(False, "--check", help="Validate the recipe and stop."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the run summary as JSON here."),
    ) -> None:
        """Run a recipe: chained stages (prune, merge, eval) from one YAML file."""
        from ..recipe import load_recipe, run_recipe

        with user_errors():
            if check:
                r = load_recipe(recipe)
                console.print(f"recipe ok: {len(r.stages)} stage(s) -> {r.output}")
                return
            summary = run_recipe(recipe, overwrite=overwrite, say=lambda m: console.print(f"[bold]{m}[/]"))
        write_json(json_out, summary)
        console.print(f"[green]done[/]: {summary['recipe']['output']}")
