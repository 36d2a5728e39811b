"""``moecompress stats MODEL ...`` (collect) and ``moecompress stats show FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from ..options import StatsOptions, cli_command
from ._common import console, fitted_tables, user_errors, write_json


class _CollectByDefault(TyperGroup):
    """``stats`` is a group (``collect``, ``show``); anything that is not a subcommand name
    goes to ``collect``, so ``moecompress stats MODEL --calib F`` works as written."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["collect", *args]
        return super().parse_args(ctx, args)


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _layer_table(stats) -> list:
    summary = stats.summary()
    sizes = "/".join(map(str, stats.meta.get("sch_cache_sizes", [])))
    heads = ["layer", "unused", "entropy", "load CV", "max share", f"SRP m={stats.meta.get('segment_len')}",
             f"SCH C={sizes}", "super"]
    rows = [[str(row["layer"]), str(row["unused_experts"]), _fmt(row["entropy"]), _fmt(row["load_cv"]),
             _fmt(row["max_share"]), _fmt(row["srp"]), "/".join(_fmt(v, 2) for v in row["sch"]),
             ",".join(map(str, row["super_experts"])) or "-"] for row in summary["layers"]]
    return fitted_tables("routing statistics per MoE layer", heads, rows)


def _expert_table(stats, layer: int) -> list:
    names = ("count", "soft_count", "gate_mean", "ean", "reap", "easy_ep", "tcess", "super_in_max", "super_out_max")
    heads = ["e", "count", "soft", "gate", "EAN", "REAP", "EASY-EP", "TCESS", "in max", "out max", "SE"]
    cols = [stats.get(layer, n) for n in names]
    sup = stats.get(layer, "super_experts")
    rows = [[str(e), str(int(cols[0][e])), *[f"{float(c[e]):.3g}" for c in cols[1:]], "yes" if bool(sup[e]) else ""]
            for e in range(cols[0].numel())]
    return fitted_tables(f"layer {layer}: per-expert statistics (in/out max = |down_proj input/output|)", heads, rows)


def _meta_line(meta: dict) -> str:
    keys = ("model", "family", "calib", "n", "seq_len", "tokens", "seed", "num_experts", "top_k", "dtype")
    return "  ".join(f"{k}={meta[k]}" for k in keys if k in meta)


def show_result(stats, model=None, output=None, *, wrote: bool = True) -> None:
    """What `stats` prints for collected statistics (``run`` prints it for its stats stages)."""
    console.print(_meta_line(stats.meta), highlight=False)
    console.print(*_layer_table(stats))


def register(app: typer.Typer) -> None:
    stats_app = typer.Typer(cls=_CollectByDefault, no_args_is_help=True, add_completion=False,
                            help="Routing statistics on calibration text: `stats MODEL --calib FILE -o stats.safetensors`, "
                                 "`stats show FILE`.")

    @stats_app.command("collect")
    @cli_command(StatsOptions)
    def collect(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        output: Path = typer.Option(..., "-o", "--output", help="Statistics file (.safetensors); a .json summary is "
                                    "written beside it."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw a per-layer expert-usage heatmap (PNG, "
                                            "needs matplotlib)."),
        opts: StatsOptions = None,
    ) -> None:
        """Collect per-layer, per-expert routing statistics (counts, REAP, EAN, EASY-EP, TCESS, super experts, SRP/SCH...)."""
        from ..plotting import pyplot
        from ..stats.api import plot_usage, stats_for_checkpoint

        with user_errors():
            if plot is not None:
                pyplot()  # fail before the long run, not after
            stats = stats_for_checkpoint(model, output, options=opts)
            if plot is not None:
                plot_usage(stats, plot)
        write_json(opts.json_out, stats.summary())
        if opts.json_out is not None and str(opts.json_out) == "-":
            return
        show_result(stats, model, None)
        console.print(f"wrote {output} and {output.with_suffix('.json')}" + (f" and {plot}" if plot else ""), highlight=False)

    @stats_app.command("show")
    def show(
        file: Path = typer.Argument(..., help="Statistics file written by `moecompress stats`."),
        layer: Optional[int] = typer.Option(None, "--layer", help="Also print every expert of this decoder layer."),
        plot: Optional[Path] = typer.Option(None, "--plot", help="Draw a per-layer expert-usage heatmap (PNG, needs matplotlib)."),
        as_json: bool = typer.Option(False, "--json", help="Print the JSON summary instead of tables."),
    ) -> None:
        """Print the statistics of FILE as tables (per layer; per expert with --layer)."""
        import json

        from ..errors import MoECompressError
        from ..stats import Stats
        from ..stats.api import plot_usage

        with user_errors():
            stats = Stats.load(file)
            if layer is not None and layer not in stats.layers:
                raise MoECompressError(f"layer {layer} is not an MoE layer of this file; MoE layers: {stats.layers}")
            if plot is not None:
                plot_usage(stats, plot)
        if as_json:
            typer.echo(json.dumps(stats.summary(), indent=2, sort_keys=True))
            return
        show_result(stats)
        if layer is not None:
            console.print(*_expert_table(stats, layer))
        if plot is not None:
            console.print(f"wrote {plot}", highlight=False)

    app.add_typer(stats_app, name="stats")
