"""Helpers shared by the CLI commands: error reporting, tables, JSON output."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console

from ..errors import MoECompressError

# Options that several commands take with the same meaning, declared once.
CalibSource = Annotated[str, typer.Option("--calib", help="Calibration .txt/.jsonl/.parquet, a shipped set "
                                          "(python_docs, python_code, numpy_docs) or a Hub dataset org/name[:split].")]
Samples = Annotated[int, typer.Option("-n", help="Number of calibration sequences.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.")]
CalibSeed = Annotated[int, typer.Option("--seed", help="Seed for drawing the calibration sequences.")]
CalibMode = Annotated[str, typer.Option("--mode", help="chunk: concatenate and cut; document: one sequence per document.")]
CalibField = Annotated[str, typer.Option("--field", help="Text field of .jsonl / column of .parquet / Hub datasets.")]
MaxGpuMemory = Annotated[Optional[str], typer.Option("--max-gpu-memory", help="Stream the model under this GPU memory "
                                                     "cap (e.g. 4GiB): layers are onloaded one at a time while they run.")]
MaxCpuMemory = Annotated[Optional[str], typer.Option("--max-cpu-memory", help="CPU memory cap when streaming; the rest "
                                                     "is offloaded to disk (e.g. 32GiB).")]
MtpMode = Annotated[str, typer.Option("--mtp", help="Multi-token-prediction layers the checkpoint stores "
                                      "(num_nextn_predict_layers): prune (their experts, chosen by their own router on "
                                      "--calib) or drop (remove them; num_nextn_predict_layers 0).")]

console = Console()
err_console = Console(stderr=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn MoECompressError into one red line on stderr and exit code 2."""
    try:
        yield
    except MoECompressError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def not_implemented(stage: str) -> None:
    err_console.print(f"[bold red]error:[/] `moecompress {stage}` is not implemented yet in this version")
    raise typer.Exit(2)


def write_json(path: Path | None, data: Any) -> None:
    if path is None:
        return
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)
