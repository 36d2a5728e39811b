"""`moecompress distill`: knowledge distillation of a compressed student from its teacher.

The flags are made from :class:`moecompress.distill.DistillOptions` (name, default, help,
panel), so the command, the library and a recipe cannot drift; the library does the work.
Several processes: ``accelerate launch -m moecompress distill ...``.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import console, user_errors, write_json


def _flag_type(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin is typing.Union:
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return Optional[_flag_type(inner)]
    return annotation


def _option_parameters() -> list[inspect.Parameter]:
    from ..distill import DistillOptions

    params = []
    for name, info in DistillOptions.model_fields.items():
        extra = info.json_schema_extra or {}
        choices = typing.get_args(info.annotation) if typing.get_origin(info.annotation) is typing.Literal else ()
        help_ = info.description + (f" One of: {', '.join(choices)}." if choices else "")
        flags = extra.get("flags") or ["--" + name.replace("_", "-")]
        default = info.get_default(call_default_factory=True)
        meta = typer.Option(*flags, help=help_, rich_help_panel=extra.get("panel"), show_default=default not in (None, []))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[_flag_type(info.annotation), meta]))
    return params


def register(app: typer.Typer) -> None:
    def distill(
        student: str = typer.Argument(..., help="The compressed checkpoint to train (with --stages: the original "
                                      "model, slimmed stage by stage)."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the distilled checkpoint."),
        teacher: Optional[str] = typer.Option(None, "--teacher", help="The uncompressed model (default with --stages: "
                                              "STUDENT itself)."),
        data: str = typer.Option(..., "--data", help="Training text: what --calib takes (.txt/.jsonl/.parquet, a "
                                 "shipped set, a Hub dataset org/name[:split])."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here ('-' = stdout)."),
        **options,
    ) -> None:
        """Distil a compressed student from its teacher (KL of next-token distributions, optionally hidden
        states), or slim a model in SlimMoE stages with distillation after each cut.

        Writes a standard checkpoint of the student's shape, moecompress.json (teacher, data hash, steps,
        schedule, seeds) and loss_curve.json / loss_curve.png.
        """
        from ..distill import distill_checkpoint
        from ..distill.options import validate

        with user_errors():
            opts = validate(options)
            result = distill_checkpoint(student, output, teacher=teacher, data=data, options=opts,
                                        progress=json_out is None or str(json_out) != "-")
        from accelerate import PartialState

        if not PartialState().is_main_process:  # under `accelerate launch`, one report
            return
        write_json(json_out, result.to_dict())
        if json_out is not None and str(json_out) == "-":
            return
        if result.stopped:
            console.print(f"stopped after {result.steps} steps as asked; continue with --resume", highlight=False)
            return
        ev = "".join(f"; {k} ppl {result.eval_before.get(k, float('nan')):.2f} -> {v:.2f}"
                     for k, v in result.eval_after.items())
        console.print(f"{' -> '.join(result.schedule)}: {result.steps} steps, {result.tokens:,} tokens, "
                      f"{result.tokens_per_s:,.0f} tokens/s; loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
                      f"{ev}; wrote {output}", highlight=False)

    sig = inspect.signature(distill)
    own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    distill.__signature__ = sig.replace(parameters=own + _option_parameters())
    app.command(name="distill")(distill)
