"""`moecompress prune --method heapr|moe-pruner|wanda|magnitude|stun-unstructured`: the
fine-grained branch of the prune command (the command itself lives in commands/prune.py)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..errors import MoECompressError
from .api import METHODS


def wants_finegrained(method: str, sparsity: float | None, nm: str | None, stun_expert_ratio: float | None = None,
                      heapr_global: bool = False) -> bool:
    """Fine-grained methods, and ``stun`` given a second-stage budget (the full STUN pipeline).
    Fine-grained options given to a whole-expert method are refused rather than ignored."""
    if method in METHODS or (method == "stun" and (sparsity is not None or nm is not None)):
        return True
    given = [flag for flag, v in (("--sparsity", sparsity), ("--nm", nm), ("--stun-expert-ratio", stun_expert_ratio),
                                  ("--heapr-global", heapr_global or None)) if v is not None]
    if given:
        raise MoECompressError(f"{given[0]} applies to the fine-grained methods ({', '.join(METHODS)}; stun with "
                               f"--sparsity/--nm), not to '{method}'")
    return False


def run(model: str, output: Path, method: str, *, keep: int | None, ratio: float | None, sparsity: float | None,
        nm: str | None, heapr_global: bool, stun_expert_ratio: float | None, stun_unstructured: str,
        calib: str | None, n: int, seq_len: int, seed: int, overwrite: bool, dtype: str, device: str | None,
        batch_size: int, field: str, json_out: Path | None, stats: Path | None = None,
        protect_super_experts: bool = False) -> None:
    from ..commands._common import console, write_json
    from ..info import model_info
    from .api import prune_checkpoint

    if keep is not None:
        raise MoECompressError("--keep counts whole experts; fine-grained methods take --ratio (heapr), "
                               "--sparsity or --nm (and --stun-expert-ratio for stun)")
    if stats is not None or protect_super_experts:
        raise MoECompressError("--stats and --protect-super-experts belong to whole-expert pruning; the fine-grained "
                               "methods measure on --calib text")
    options: dict = {"batch_size": batch_size, "progress": json_out is None or str(json_out) != "-"}
    if method in ("stun", "stun-unstructured"):
        method = "stun-unstructured"
        expert_ratio = stun_expert_ratio if stun_expert_ratio is not None else ratio
        options.update(sparsity=sparsity, nm=nm, stun_expert_ratio=expert_ratio, stun_unstructured=stun_unstructured)
    elif method == "heapr":
        options.update(ratio=ratio, heapr_global=heapr_global)
        if sparsity is not None or nm is not None:
            raise MoECompressError("heapr removes whole neurons: use --ratio, not --sparsity/--nm")
    else:
        if ratio is not None:
            raise MoECompressError(f"{method} prunes single weights: use --sparsity S or --nm N:M, not --ratio")
        options.update(sparsity=sparsity, nm=nm)
    if method != "heapr" and heapr_global:
        raise MoECompressError("--heapr-global only applies to --method heapr")
    report = prune_checkpoint(model, output, method, calib=calib, n=n, seq_len=seq_len, seed=seed,
                              overwrite=overwrite, dtype=dtype, device=device, field=field, **options)
    before, after = model_info(model), model_info(output)
    data = {**report, "output": str(output), "params_before": before["total_params"],
            "params_after": after["total_params"], "disk_bytes_after": sum(after["disk_bytes_by_dtype"].values())}
    if json_out is not None:
        write_json(json_out, data)
    if json_out is None or str(json_out) != "-":
        console.print(_table(report, before, after))
        console.print(f"wrote {output}", highlight=False)


def _table(report: dict, before: dict, after: dict) -> Table:
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
