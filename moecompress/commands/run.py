"""``moecompress run RECIPE.yaml``: every stage of a YAML recipe, validated before any work."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from ._common import console, err_console, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        recipe: Path = typer.Argument(..., help="YAML recipe: model, stages, calibration (`moecompress ls recipes`)."),
        sets: List[str] = typer.Option([], "--set", help="Override a key: model=PATH, output=DIR, calibration.n=8, "
                                       "prune.keep=4 (every prune stage) or stages.2.keep=4 (repeatable)."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output folder (overrides the recipe's)."),
        check: bool = typer.Option(False, "--check", help="Validate the recipe (names, types, ranges; with a local "
                                   "model, each stage's expert count) and stop."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last completed stage."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the run summary as JSON here."),
    ) -> None:
        """Run a recipe: stats, prune, merge, quantize, distill, eval and upload stages chained from one YAML file."""
        from ..recipe import load_recipe, run_stages
        from ..recipe.runner import check_local_expert_counts

        with user_errors():
            r = load_recipe(recipe, sets, output=str(output) if output else None, check=check)
            if check:
                check_local_expert_counts(r)
                missing = sorted({s.name for s in r.stages if not s.options.implemented})
                console.print(f"recipe ok: {len(r.stages)} stage(s): {' -> '.join(s.name for s in r.stages)}"
                              + (f"; output {r.output}" if r.output else "")
                              + (f"; not in this version (run refuses them): {', '.join(missing)}" if missing else ""),
                              highlight=False)
                return
            quiet = json_out is not None and str(json_out) == "-"
            summary = run_stages(r, overwrite=overwrite, resume=resume, progress=not quiet,
                                 say=lambda m: err_console.print(Text(m, style="bold")),
                                 report=None if quiet else _show)
        summary.pop("results")
        write_json(json_out, summary)
        if not quiet:
            console.print(Text.assemble(("done", "green"), f": {summary['output']}"))


def _show(stage, result, model, output) -> None:
    """A stage's result as its own command prints it (``moecompress/commands/<stage>.py`` ``show_result``)."""
    import importlib

    show = getattr(importlib.import_module(f"{__package__}.{stage.name}"), "show_result", None)
    if show is not None:
        show(result, model, output, wrote=False)
