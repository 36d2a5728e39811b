"""Helpers shared by the CLI commands: error reporting, tables, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console

from ..errors import MoECompressError

console = Console()
err_console = Console(stderr=True)


def print_error(message: str) -> None:
    """One red ``error:`` line on stderr; the message is printed as it is (a path with
    ``[`` ``]`` in it is not rich markup)."""
    from rich.text import Text

    try:
        err_console.print(Text.assemble(("error:", "bold red"), " ", str(message)), highlight=False, soft_wrap=True)
    except Exception:  # a broken terminal must not turn an error into a traceback
        sys.stderr.write(f"error: {message}\n")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn MoECompressError into one red line on stderr and exit code 2."""
    try:
        yield
    except MoECompressError as e:
        print_error(str(e))
        raise typer.Exit(2) from None


def not_implemented(stage: str) -> None:
    print_error(f"`moecompress {stage}` is not implemented yet in this version")
    raise typer.Exit(2)


def write_json(path: Path | None, data: Any) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        from ..outputs import atomic_write

        atomic_write(path, text)


def one_stage(name: str, model: str, output, opts, *, progress: bool = True):
    """Run one checkpoint stage as the one-stage recipe it means (so the command and the recipe
    write the same bytes, recipe.yaml included); returns the stage's result."""
    from ..recipe import Recipe, Stage, run_stages

    recipe = Recipe(path="(command line)", model=str(model), output=str(output), stages=[Stage(1, name, opts)])
    return run_stages(recipe, overwrite=opts.overwrite, progress=progress)["results"][0]
