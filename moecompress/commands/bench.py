"""`moecompress bench`: prefill/decode speed and peak memory of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ._common import console, user_errors, write_json


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        prompt_len: int = typer.Option(128, "--prompt-len", help="Prompt tokens per sequence (prefill)."),
        gen_len: int = typer.Option(64, "--gen-len", help="Generated tokens per sequence (decode)."),
        batch: int = typer.Option(1, "--batch", help="Sequences per batch."),
        repeats: int = typer.Option(3, "--repeats", help="Timed runs (the best is kept) after one warm-up."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's), float32, bfloat16, float16."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the JSON here."),
    ) -> None:
        """Prefill and decode tokens/s and peak memory (CUDA peak on GPU, RSS increase on CPU)."""
        from ..bench_speed import benchmark
        from ..checkpoint import load_model
        from ..evaluate import default_device

        from ..errors import MoECompressError

        with user_errors():
            for flag, v in (("--prompt-len", prompt_len), ("--gen-len", gen_len), ("--batch", batch), ("--repeats", repeats)):
                if v < 1:  # before the model is loaded
                    raise MoECompressError(f"{flag} must be at least 1 (got {v})")
            dev = device or default_device()
            m = load_model(model, dtype=dtype, device=None if dev == "cpu" else dev)
            data = {"model": model, **benchmark(m, prompt_len=prompt_len, gen_len=gen_len, batch=batch,
                                                repeats=repeats)}
        write_json(output, data)
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        t = Table(title=f"{model}  ({data['device']}, {data['dtype']}, batch {batch})", show_header=False)
        t.add_row("prefill", f"{data['prefill_tokens_per_s']:,.0f} tokens/s  ({prompt_len} prompt tokens)")
        if data["decode_tokens_per_s"] is not None:
            t.add_row("decode", f"{data['decode_tokens_per_s']:,.1f} tokens/s  ({gen_len} new tokens)")
        mem = "CUDA peak allocated" if data["memory_kind"] == "cuda_max_allocated" else "peak RSS increase"
        t.add_row(f"memory ({mem})", _mib(data["peak_memory_bytes"]))
        t.add_row("weights", _mib(data["weights_bytes"]))
        console.print(t)
