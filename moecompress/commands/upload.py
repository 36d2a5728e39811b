"""`moecompress upload`: model card + Hugging Face Hub upload of a compressed checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..options import UploadOptions, cli_command
from ._common import console, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    @cli_command(UploadOptions)
    def upload(
        folder: Path = typer.Argument(..., help="Compressed checkpoint folder (output of a moecompress stage)."),
        opts: UploadOptions = None,
    ) -> None:
        """Write a model card (recipe, what changed, eval table from DIR/eval.json) and upload DIR."""
        from ..upload import upload as do_upload

        with user_errors():
            out = do_upload(folder, options=opts)
        write_json(opts.json_out, out)
        if opts.json_out is not None and str(opts.json_out) == "-":
            return
        verb = "would send" if opts.dry_run else "sent"
        title = f"{opts.repo_id}: {verb} {len(out['files'])} files, {out['bytes'] / 2**20:.1f} MiB"
        t = Table(title=title, min_width=len(title) + 2)
        t.add_column("file")
        t.add_column("size", justify="right")
        for f in out["files"]:
            t.add_row(f["path"], f"{f['bytes'] / 2**20:.2f} MiB" if f["bytes"] >= 2**20 else f"{f['bytes']} B")
        console.print(t)
        console.print(f"model card: {out['card']}", highlight=False)
        if out["url"]:
            console.print(f"uploaded: {out['url']}", highlight=False)
