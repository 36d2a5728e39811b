"""``moecompress ls methods|families|recipes``: what this version offers, one line each."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import console, user_errors

WHAT = ("methods", "families", "recipes")


def recipe_folders() -> list[Path]:
    """``./recipes`` and the repository's ``recipes/`` (for a source checkout)."""
    here = Path(__file__).resolve().parents[2] / "recipes"
    return [p for p in dict.fromkeys([Path("recipes").resolve(), here]) if p.is_dir()]


def recipe_summary(path: Path) -> str:
    """The first line of the recipe's leading comment."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def rows(what: str) -> list[tuple[str, ...]]:
    if what == "methods":
        from ..merge.api import METHODS as MERGE
        from ..prune.registry import registry

        out = [(f"prune --method {m.name}", m.kind, m.summary) for m in registry().values()]
        out += [(f"merge --method {m.name}", "experts", m.summary) for m in MERGE.values()]
        return out
    if what == "families":
        from ..arch import registry

        seen = {}
        for model_type, spec in registry().items():
            seen.setdefault(spec.name, []).append(model_type)
        return [(name, ", ".join(types)) for name, types in sorted(seen.items())]
    return [(f"recipes/{p.name}", recipe_summary(p)) for folder in recipe_folders() for p in sorted(folder.glob("*.yaml"))]


def register(app: typer.Typer) -> None:
    @app.command("ls")
    def ls(what: str = typer.Argument(..., help="methods, families or recipes.")) -> None:
        """List the pruning/merging methods (with their papers), the supported families or the shipped recipes."""
        from ..errors import MoECompressError

        with user_errors():
            if what not in WHAT:
                raise MoECompressError(f"unknown list '{what}'; use one of: {', '.join(WHAT)}")
        heads = {"methods": ("method", "removes", "what it does (paper)"), "families": ("family", "model_type"),
                 "recipes": ("recipe", "what it does")}[what]
        t = Table(show_edge=False, box=None, pad_edge=False)
        for h in heads:
            t.add_column(h)
        for r in rows(what):
            t.add_row(*r)
        console.print(t)
