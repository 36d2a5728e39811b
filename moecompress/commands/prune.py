"""`moecompress prune`: remove whole experts, neurons or weights from every MoE layer."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..options import PruneOptions, cli_command
from ._common import console, one_stage, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    @cli_command(PruneOptions)
    def prune(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the pruned checkpoint."),
        opts: PruneOptions = None,
    ) -> None:
        """Prune every MoE layer: whole experts (--keep N or --ratio R), neurons (heapr --ratio) or weights
        (--sparsity / --nm); `moecompress ls methods` lists the methods.

        Writes a standard checkpoint (fewer experts or smaller experts, router rows sliced, config updated, top-k
        lowered to the kept count if needed) with a moecompress.json record. With both --stats and --calib, the
        file's statistics are used and the text feeds naee.
        """
        from ..info import model_info

        to_stdout = opts.json_out is not None and str(opts.json_out) == "-"
        with user_errors():
            result = one_stage("prune", model, output, opts, progress=not to_stdout)
            before, after = model_info(model), model_info(output)
        data = {**(result.report if result.kind != "experts" else result.to_dict()), "output": str(output),
                "params_before": before["total_params"], "params_after": after["total_params"],
                "disk_bytes_after": sum(after["disk_bytes_by_dtype"].values())}
        write_json(opts.json_out, data)
        if not to_stdout:
            show_result(result, model, output)


def show_result(result, model, output, *, wrote: bool = True) -> None:
    """What `prune` prints for ``result`` (``model`` pruned into ``output``); ``run`` prints it
    for its prune stages with ``wrote=False``."""
    from ..info import model_info

    before, after = model_info(model), model_info(output)
    if result.kind != "experts":
        console.print(_fine_table(result.report, before, after))
        if wrote:
            console.print(f"wrote {output}", highlight=False)
        return
    console.print(_table(result))
    if result.info.get("groups", {}).get("note"):
        console.print(f"note: {result.info['groups']['note']}", highlight=False)
    console.print(f"{result.num_experts} -> {result.keep} experts in {len(result.kept)} MoE layers "
                  f"({result.method}); parameters {_human(before['total_params'])} -> "
                  f"{_human(after['total_params'])}; {f'wrote {output} ' if wrote else ''}in {result.seconds:.1f} s",
                  highlight=False)


def _human(n: float) -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{suffix}" if suffix else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _table(result) -> Table:
    t = Table(title=f"expert pruning: {result.method}, {result.keep} of {result.num_experts} kept")
    t.add_column("layer", justify="right")
    t.add_column("removed experts")
    summary = result.score_summary()
    layers_info = result.info.get("layers", {})
    from ..prune import METHODS

    # The kept share of a statistic is meaningful; of random draws or NAEE's removal errors it is not.
    has_share = METHODS[result.method].needs == "stats" and any(s.get("kept_share") is not None for s in summary.values())
    has_err = any("relative_error" in v for v in layers_info.values())
    if has_share:
        t.add_column("score share kept", justify="right")
    if has_err:
        t.add_column("output error", justify="right")
    if any(result.protected.values()):
        t.add_column("protected")
    for li in sorted(result.kept):
        row = [str(li), _ranges(result.removed[li])]
        if has_share:
            share = summary.get(li, {}).get("kept_share")
            row.append("" if share is None else f"{share:.1%}")
        if has_err:
            row.append(f"{layers_info[li]['relative_error']:.2%}")
        if any(result.protected.values()):
            row.append(_ranges(result.protected.get(li, [])))
        t.add_row(*row)
    return t


def _fine_table(report: dict, before: dict, after: dict) -> Table:
    t = Table(title=f"fine-grained pruning: {report['method']}", show_header=False)
    if report["method"] == "heapr":
        t.add_row("atomic experts removed", f"{report['atoms_removed']} of {report['atoms_total']}")
        t.add_row("mode", report["mode"])
        if "intermediate_size_after" in report:
            t.add_row("expert intermediate size", f"{report['intermediate_size_before']} -> {report['intermediate_size_after']}"
                      f" ({report['ratio_effective']:.1%} removed, asked {report['ratio']:.1%}; sizes are multiples "
                      f"of {report['align']} for the grouped-matmul kernels)")
        for li, v in report.get("shared_experts_shrunk", {}).items():
            t.add_row(f"shared expert, layer {li}", f"{v['before']} -> {v['after']}")
    else:
        if report["method"] == "stun":
            t.add_row("experts", f"{report['experts_before']} -> {report['experts_after']} ({report['expert_method']})")
            t.add_row("second stage", f"{report['unstructured_method']}")
        pattern = report.get("nm") or report.get("unstructured", {}).get("nm")
        if pattern:
            t.add_row("pattern", pattern)
        t.add_row("expert-weight sparsity", f"{report['expert_weight_sparsity']:.1%}")
        t.add_row("storage", "dense with zeros (same size on disk)")
    t.add_row("parameters stored", f"{before['total_params']:,} -> {after['total_params']:,}")
    return t
