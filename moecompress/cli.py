"""The `moecompress` command line: a thin layer over the library.

Each stage lives in ``moecompress/commands/<stage>.py`` and registers itself on ``app``.
Bad input raises :class:`MoECompressError`, printed here as one line with exit code 2.
"""

from __future__ import annotations

import sys

import typer

from .commands import register_all

app = typer.Typer(
    name="moecompress",
    help="Compress Mixture-of-Experts language models: stats, prune, merge, quantize, distill, eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_all(app)


def main() -> None:
    app(prog_name="moecompress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
