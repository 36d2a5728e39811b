"""``moecompress quantize MODEL -o OUT``: quantize the experts (flags generated from ``QuantizeOptions``)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..options import QuantizeOptions, cli_command
from ._common import console, user_errors, write_json


def _table(result) -> Table:
    t = Table(title=f"{result.options['quantizer']} quantization of the experts ({result.options['granularity']})")
    for col in ("layer", "width", "experts by width", "round-to-nearest fallbacks"):
        t.add_column(col, justify="left" if col == "experts by width" else "right")
    fallbacks: dict[int, int] = {}
    for f in result.fallbacks:
        fallbacks[f["layer"]] = fallbacks.get(f["layer"], 0) + 1
    for li, ws in result.widths.items():
        counts: dict = {}
        for w in ws:
            counts[w] = counts.get(w, 0) + 1
        shown = ", ".join(f"{w}: {c}" for w, c in sorted(counts.items(), key=lambda kv: str(kv[0])))
        t.add_row(str(li), str(result.layer_widths()[li]), shown, str(fallbacks.get(li, 0)))
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    @cli_command(QuantizeOptions)
    def quantize(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the quantized checkpoint."),
        opts: QuantizeOptions = None,
    ) -> None:
        """Quantize the experts (GPTQ or RTN; uniform, per-layer or MC-MoE per-expert widths) into a
        compressed-tensors checkpoint that transformers and vLLM load, or a fake-quantized one."""
        from ..quantize import quantize_checkpoint

        to_stdout = opts.json_out is not None and str(opts.json_out) == "-"
        with user_errors():
            result = quantize_checkpoint(model, output, options=opts, progress=not to_stdout)
        data = {**result.to_dict(with_time=False), "output": str(output)}
        write_json(opts.json_out, data)
        if to_stdout:
            return
        for note in result.notes:
            console.print(f"note: {note}", highlight=False)
        show_result(result, model, output)


def show_result(result, model, output, *, wrote: bool = True) -> None:
    """What `quantize` prints for ``result``; ``run`` prints it for its quantize stages with ``wrote=False``."""
    data = result.to_dict(with_time=False)
    console.print(_table(result))
    sym = "" if result.options["symmetric"] else " + zero points"
    console.print(f"{data['average_bits']:.3f} bits per expert weight (weights {result.average_width:.3f} + scales"
                  f"{sym}); experts {data['expert_bytes'] / 2**20:.2f} MiB; {f'wrote {output} ' if wrote else ''}"
                  f"in {result.seconds:.1f} s", highlight=False)
    if wrote and result.options.get("granularity", "uniform") != "uniform":
        from ..plotting import BIT_MAP

        console.print(f"bit map: {Path(output) / BIT_MAP}", highlight=False)
