from __future__ import annotations

import typer

from ._common import not_implemented


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def bench() -> None:
        """(not implemented yet)"""
        not_implemented("bench")
