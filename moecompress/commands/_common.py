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


def fitted_tables(title: str, heads: list[str], rows: list[list[str]], *, right: bool | list[bool] = True,
                  repeat: int = 1, text: int | None = None, width: int | None = None):
    """``heads``/``rows`` as one rich table, or, when the terminal is too narrow to show every
    cell in full, as several that each repeat the first ``repeat`` columns: rich would otherwise
    cut numbers to "1.62…". Headers wrap at spaces; the column ``text`` (free text) wraps at
    spaces and takes what is left."""
    from rich.table import Table

    width = width or console.width
    right = right if isinstance(right, list) else [right] * len(heads)
    cells = list(zip(*rows)) if rows else [()] * len(heads)

    def need(i: int) -> int:  # the narrowest column that cuts nothing
        words = [*heads[i].split(), *(w for c in cells[i] for w in (c.split() if i == text else [c]))]
        return max(map(len, words), default=1)

    def span(cols) -> int:  # the width of a table of these columns, none cut
        return 1 + sum(need(i) + 3 for i in cols)

    natural = [max([len(heads[i]), *map(len, cells[i])]) for i in range(len(heads))]
    if 1 + sum(n + 3 for n in natural) <= width:  # everything fits unwrapped
        t = Table(title=title, title_justify="left")
        for i, head in enumerate(heads):
            t.add_column(head, justify="right" if right[i] else "left", no_wrap=i != text)
        for row in rows:
            t.add_row(*row)
        return [t]
    groups, current = [], list(range(min(repeat, len(heads))))
    for i in range(len(current), len(heads)):
        if span(current + [i]) > width and len(current) > repeat:
            groups.append(current)
            current = list(range(repeat))
        current.append(i)
    groups.append(current)
    key, rest = list(range(min(repeat, len(heads)))), list(range(min(repeat, len(heads)), len(heads)))
    per = -(-len(rest) // len(groups))  # the same columns in as even groups, where they fit
    even = [key + rest[k:k + per] for k in range(0, len(rest), per)] if rest else []
    if rest and len(even) == len(groups) and all(span(g) <= width for g in even):
        groups = even
    tables = []
    for g, cols in enumerate(groups):
        t = Table(title=title if g == 0 else None, title_justify="left")
        for i in cols:
            fixed = None if i == text else need(i)
            t.add_column(heads[i], justify="right" if right[i] else "left", width=fixed, min_width=need(i))
        for row in rows:
            t.add_row(*(row[i] for i in cols))
        tables.append(t)
    return tables
