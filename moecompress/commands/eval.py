"""`moecompress eval`: perplexity, KL to the base, lm-eval tasks; tables, JSON and markdown."""

from __future__ import annotations

import typer

from ..options import EvalOptions, cli_command
from ._common import console, err_console, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    @cli_command(EvalOptions)
    def eval(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id to evaluate."),
        opts: EvalOptions = None,
    ) -> None:
        """Perplexity on text files, KL and top-1 agreement against --base, and lm-eval tasks.

        Perplexity: non-overlapping windows of --seq-len tokens over the first --max-tokens tokens
        of each file (the testbed's reference convention), context reset at each window.
        """
        from ..evaluate import evaluate_checkpoint, markdown_table

        with user_errors():
            result = evaluate_checkpoint(model, options=opts,
                                         progress=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
        write_json(opts.json_out, result)
        if opts.markdown is not None:
            opts.markdown.write_text(markdown_table(result))
        if opts.json_out is None or str(opts.json_out) != "-":
            show_result(result, model, None)


def show_result(result: dict, model, output=None, *, wrote: bool = True) -> None:
    """What `eval` prints: the table (the model against its base) and the settings line."""
    from ..evaluate import rich_table, settings_line

    base = result.get("base", {}).get("model")
    console.print(rich_table(result, title=f"{result.get('model', model)}" + (f" vs {base}" if base else "")))
    console.print(f"[dim]{settings_line(result)}[/]", highlight=False)
