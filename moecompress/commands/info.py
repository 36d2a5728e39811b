from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ._common import console, user_errors


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}{unit}" if suffix else f"{n:.0f}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def register(app: typer.Typer) -> None:
    @app.command()
    def info(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Also write the JSON here."),
    ) -> None:
        """Family, MoE/dense layers, experts, top-k, shared experts, parameters and size on disk."""
        from ..info import model_info

        with user_errors():
            data = model_info(model)
        if output is not None:
            output.write_text(json.dumps(data, indent=2) + "\n")
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        t = Table(title=f"{data['model']}  ({data['family']})", show_header=False)
        t.add_row("layers", f"{data['num_layers']} ({data['num_moe_layers']} MoE, {len(data['dense_layers'])} dense)")
        t.add_row("experts per MoE layer", ", ".join(map(str, data["experts_per_layer"])))
        t.add_row("top-k", str(data["top_k"]))
        t.add_row("shared experts", "yes" if data["shared_experts"] else "no")
        t.add_row("routing", ", ".join(f"{k}={v}" for k, v in data["routing"].items()))
        t.add_row("parameters (total)", _human(data["total_params"]))
        t.add_row("parameters (active per token)", _human(data["active_params"]))
        t.add_row("routed-expert parameters", _human(data["routed_expert_params"]))
        for dt, n in sorted(data["disk_bytes_by_dtype"].items()):
            t.add_row(f"on disk ({dt})", _human(n, "B"))
        q = data.get("quantization")
        if q:
            t.add_row("quantization", q["method"])
            if "expert_bits_per_weight" in q:
                t.add_row("expert bits per weight (on disk)", f"{q['expert_bits_per_weight']:.3f}")
            if q.get("recorded_average_bits") is not None:
                t.add_row("expert bits per weight (recorded widths)", f"{q['recorded_average_bits']:.3f}")
            if q.get("experts_quantized") is False:
                t.add_row("experts quantized", "NO")
            if q.get("note"):
                t.add_row("note", q["note"])
        console.print(t)
