"""`moecompress upload`: model card + Hugging Face Hub upload of a compressed checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ._common import console, user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def upload(
        folder: Path = typer.Argument(..., help="Compressed checkpoint folder (output of a moecompress stage)."),
        repo_id: str = typer.Argument(..., help="Hub repository, e.g. my-user/Qwen3-30B-A3B-pruned."),
        private: bool = typer.Option(False, "--private", help="Create the repository as private."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Write README.md and list the files; send nothing."),
        token: Optional[str] = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or `hf auth login`)."),
        base_model: Optional[str] = typer.Option(None, "--base-model", help="Hub id for the card's base_model "
                                                 "(default: the recorded source when it is a Hub id)."),
        endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or "
                                               "https://huggingface.co)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Write a model card (recipe, what changed, eval table from DIR/eval.json) and upload DIR."""
        from ..upload import upload as do_upload

        with user_errors():
            out = do_upload(folder, repo_id, private=private, token=token, dry_run=dry_run, endpoint=endpoint,
                            base_model=base_model)
        if as_json:
            typer.echo(json.dumps(out, indent=2))
            return
        verb = "would send" if dry_run else "sent"
        title = f"{repo_id}: {verb} {len(out['files'])} files, {out['bytes'] / 2**20:.1f} MiB"
        t = Table(title=title, min_width=len(title) + 2)
        t.add_column("file")
        t.add_column("size", justify="right")
        for f in out["files"]:
            t.add_row(f["path"], f"{f['bytes'] / 2**20:.2f} MiB" if f["bytes"] >= 2**20 else f"{f['bytes']} B")
        console.print(t)
        console.print(f"model card: {out['card']}", highlight=False)
        if out["url"]:
            console.print(f"uploaded: {out['url']}", highlight=False)
