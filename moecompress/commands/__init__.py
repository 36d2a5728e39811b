"""CLI commands, one module per stage; each defines ``register(app)``."""

from __future__ import annotations

import importlib

import typer

STAGES = ("info", "stats", "prune", "merge", "quantize", "distill", "eval", "bench", "run", "upload", "check", "ls")


def register_all(app: typer.Typer) -> None:
    for name in STAGES:
        importlib.import_module(f"{__name__}.{name}").register(app)
