"""`moecompress distill STUDENT --teacher TEACHER --data TEXT -o OUT`: knowledge distillation of a
compressed student from its teacher, or SlimMoE staged slimming with ``--stages``. Flags come
from ``DistillOptions``; the library does the work. Several processes:
``accelerate launch -m moecompress distill ...``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import DistillOptions, cli_command
from ._common import console, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    @cli_command(DistillOptions)
    def distill(
        student: str = typer.Argument(..., help="The compressed checkpoint to train (with --stages: the original "
                                      "model, slimmed stage by stage)."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the distilled checkpoint."),
        opts: DistillOptions = None,
    ) -> None:
        """Distil a compressed student from its teacher (KL of the next-token distributions, optionally
        hidden states), or slim a model in SlimMoE stages with distillation after each cut.

        Writes a standard checkpoint of the student's shape, moecompress.json (teacher, data hash, steps,
        schedule, seeds) and loss_curve.json / loss_curve.png.
        """
        from accelerate import PartialState

        from ..distill import distill_checkpoint

        to_stdout = opts.json_out is not None and str(opts.json_out) == "-"
        with user_errors():
            result = distill_checkpoint(student, output, options=opts, progress=not to_stdout)
        if not PartialState().is_main_process:  # under `accelerate launch`: one report
            return
        write_json(opts.json_out, result.to_dict())
        if to_stdout:
            return
        show_result(result, student, output)


def show_result(result, model, output, *, wrote: bool = True) -> None:
    """What `distill` prints for ``result``; ``run`` prints it for its distill stages with ``wrote=False``."""
    if result.stopped:
        console.print(f"stopped after {result.steps} steps as asked; continue with --resume", highlight=False)
        return
    ev = "".join(f"; {k} ppl {result.eval_before.get(k, float('nan')):.2f} -> {v:.2f}"
                 for k, v in result.eval_after.items())
    console.print(f"{' -> '.join(result.schedule)}: {result.steps} steps, {result.tokens:,} tokens, "
                  f"{result.tokens_per_s:,.0f} tokens/s; loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
                  f"{ev}{f'; wrote {output}' if wrote else ''}", highlight=False)
