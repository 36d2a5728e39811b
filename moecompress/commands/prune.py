"""`moecompress prune`: remove whole experts from every MoE layer of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ._common import CalibField, MaxCpuMemory, MaxGpuMemory, MtpMode, Samples, SeqLen, console, user_errors, write_json

_METHOD_PANEL = "Method options"
_FINE_PANEL = "Fine-grained pruning (inside experts)"


def _method_help() -> str:
    from ..prune import METHODS

    from ..finegrained.api import METHODS as FINEGRAINED  # fine-grained methods (issue 5)

    return (f"Pruning method: {', '.join(METHODS)} (whole experts); {', '.join(FINEGRAINED)} (inside experts; "
            "for heapr --ratio is the fraction of each expert's neurons removed) (docs/benchmarks.md compares them).")


def register(app: typer.Typer) -> None:
    from ..prune import DEFAULT_METHOD

    @app.command()
    def prune(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the pruned checkpoint."),
        keep: Optional[int] = typer.Option(None, "--keep", help="Experts kept in every MoE layer."),
        ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of experts removed, in (0, 1)."),
        method: str = typer.Option(DEFAULT_METHOD, "--method", "-m", help=_method_help()),
        calib: Optional[str] = typer.Option(None, "--calib", help="Calibration text (.txt, .jsonl, .parquet or a "
                                            "shipped set); domain text prunes for that domain."),
        stats: Optional[Path] = typer.Option(None, "--stats", help="Routing statistics from `moecompress stats` "
                                             "(reused instead of recomputing them)."),
        n: Samples = 64,
        seq_len: SeqLen = 512,
        field: CalibField = "text",
        seed: int = typer.Option(0, "--seed", help="Seed of the calibration sample and of `random`."),
        protect_super_experts: bool = typer.Option(False, "--protect-super-experts",
                                                   help="Never remove super-expert candidates (needs --calib or --stats)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
        dtype: str = typer.Option("auto", "--dtype", help="Compute dtype (auto = the checkpoint's); the output keeps "
                                  "the checkpoint's dtype."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, auto ... (default: cpu)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Calibration sequences per forward pass."),
        max_gpu_memory: MaxGpuMemory = None,
        max_cpu_memory: MaxCpuMemory = None,
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here ('-' = stdout)."),
        mtp: MtpMode = "prune",
        naee_tokens: Optional[int] = typer.Option(None, "--naee-tokens", rich_help_panel=_METHOD_PANEL,
                                                  help="naee: calibration tokens used for the reconstruction error."),
        naee_beam: Optional[int] = typer.Option(None, "--naee-beam", rich_help_panel=_METHOD_PANEL,
                                                help="naee: beam width of the search when exhaustive is too large."),
        stun_coactivation_weight: Optional[float] = typer.Option(
            None, "--stun-coactivation-weight", rich_help_panel=_METHOD_PANEL,
            help="stun: weight of co-activation in the behaviour distance (0 = router weights only)."),
        # --- fine-grained pruning options (issue 5, moecompress/finegrained) -----------------
        sparsity: Optional[float] = typer.Option(
            None, "--sparsity", rich_help_panel=_FINE_PANEL,
            help="moe-pruner/wanda/magnitude: fraction of each expert matrix's weights zeroed; stun: total over "
                 "expert weights (experts removed + zeros)."),
        nm: Optional[str] = typer.Option(None, "--nm", rich_help_panel=_FINE_PANEL,
                                         help="N:M semi-structured pattern instead of --sparsity, e.g. 2:4."),
        stun_expert_ratio: Optional[float] = typer.Option(
            None, "--stun-expert-ratio", rich_help_panel=_FINE_PANEL,
            help="stun with --sparsity/--nm: fraction of experts removed before the unstructured stage."),
        stun_unstructured: str = typer.Option("wanda", "--stun-unstructured", rich_help_panel=_FINE_PANEL,
                                              help="stun: second-stage method (wanda, moe-pruner, magnitude)."),
        heapr_global: bool = typer.Option(False, "--heapr-global", rich_help_panel=_FINE_PANEL,
                                          help="heapr: rank atoms globally and only ZERO them (no size saving)."),
        # --------------------------------------------------------------------------------------
    ) -> None:
        """Prune whole experts: keep --keep (or remove --ratio of) the experts of every MoE layer.

        Writes a standard checkpoint (fewer experts, router rows sliced, config updated, top-k lowered to the kept count if needed) with a moecompress.json record. With both --stats and --calib, the file's statistics are used and the text feeds naee.
        """
        # --- fine-grained methods (issue 5): heapr, moe-pruner, wanda, magnitude, stun + --sparsity/--nm ---
        from ..finegrained import cli as finegrained_cli

        with user_errors():
            if finegrained_cli.wants_finegrained(method, sparsity, nm, stun_expert_ratio, heapr_global):
                finegrained_cli.run(model, output, method, keep=keep, ratio=ratio, sparsity=sparsity, nm=nm,
                                    heapr_global=heapr_global, stun_expert_ratio=stun_expert_ratio,
                                    stun_unstructured=stun_unstructured, calib=calib, n=n, seq_len=seq_len, seed=seed,
                                    overwrite=overwrite, dtype=dtype, device=device, batch_size=batch_size,
                                    field=field, json_out=json_out, stats=stats,
                                    protect_super_experts=protect_super_experts)
                return
        # ---------------------------------------------------------------------------------------------------
        from ..info import model_info
        from ..prune import prune_checkpoint

        options = {k: v for k, v in {"naee_tokens": naee_tokens, "naee_beam": naee_beam,
                                     "stun_coactivation_weight": stun_coactivation_weight}.items() if v is not None}
        with user_errors():
            result = prune_checkpoint(model, output, keep=keep, ratio=ratio, method=method, calib=calib, stats=stats,
                                      n=n, seq_len=seq_len, seed=seed, protect_super_experts=protect_super_experts,
                                      overwrite=overwrite, dtype=dtype, device=device, batch_size=batch_size,
                                      field_name=field, progress=json_out is None or str(json_out) != "-",
                                      max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory, mtp=mtp,
                                      **options)
            before, after = model_info(model), model_info(output)
        data = {**result.to_dict(), "output": str(output),
                "params_before": before["total_params"], "params_after": after["total_params"],
                "disk_bytes_after": sum(after["disk_bytes_by_dtype"].values())}
        if json_out is not None:
            write_json(json_out, data)
        if json_out is None or str(json_out) != "-":
            console.print(_table(result))
            if result.info.get("groups", {}).get("note"):
                console.print(f"note: {result.info['groups']['note']}", highlight=False)
            console.print(f"{result.num_experts} -> {result.keep} experts in {len(result.kept)} MoE layers "
                          f"({result.method}); parameters {_human(before['total_params'])} -> "
                          f"{_human(after['total_params'])}; wrote {output} in {result.seconds:.1f} s", highlight=False)


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
