"""``moecompress merge MODEL -o OUT --keep N``: merge each MoE layer's experts into N."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ._common import CalibField, CalibMode, CalibSeed, CalibSource, MaxCpuMemory, MaxGpuMemory, MtpMode, Samples, SeqLen, console, user_errors, write_json


def _table(result) -> Table:
    t = Table(title="merged experts per MoE layer (merge error: relative routed-output error before the re-fit)")
    for col in ("layer", "merged experts", "largest cluster", "kept alone", "merge error", "clusters (original experts)"):
        t.add_column(col, justify="left" if col.startswith("clusters") else "right")
    for li, groups in result.clusters.items():
        err = result.merge_error.get(li)
        shown = " ".join("{" + ",".join(map(str, g)) + "}" for g in groups if len(g) > 1)
        t.add_row(str(li), str(len(groups)), str(max(len(g) for g in groups)), str(sum(len(g) == 1 for g in groups)),
                  "-" if err is None else f"{err:.3f}", shown if len(shown) <= 80 else shown[:77] + "...")
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    def merge(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the merged checkpoint."),
        keep: int = typer.Option(..., "--keep", help="Experts per MoE layer after merging."),
        method: str = typer.Option("m-smoe", "--method", help="m-smoe (default), hc-smoe or average."),
        calib: CalibSource = "python_docs",
        stats: Optional[Path] = typer.Option(None, "--stats", help="Take the routing frequencies from a "
                                             "`moecompress stats` file instead of counting them on --calib."),
        n: Samples = 64,
        seq_len: SeqLen = 512,
        seed: CalibSeed = 0,
        mode: CalibMode = "chunk",
        field: CalibField = "text",
        linkage: str = typer.Option("average", "--linkage", help="hc-smoe/average clustering: average, single, complete or ward."),
        distance: str = typer.Option("euclidean", "--distance", help="hc-smoe/average clustering distance: euclidean or cosine."),
        router: str = typer.Option("dominant", "--router", help="Router row of a merged expert: dominant (its most "
                                   "frequent member's row) or weighted (members' rows averaged like the weights)."),
        refit: bool = typer.Option(True, "--refit/--no-refit", help="Least-squares re-fit of the merged experts' down "
                                   "projections to the original layer outputs (a second calibration pass)."),
        ridge: float = typer.Option(0.01, "--ridge", help="Ridge strength of the re-fit (relative to the mean feature energy)."),
        batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
        dtype: str = typer.Option("auto", "--dtype", help="Computation dtype: auto (float32 on CPU, checkpoint dtype on GPU), "
                                  "float32, bfloat16, float16. Weights are saved in the checkpoint's dtype."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cpu)."),
        max_gpu_memory: MaxGpuMemory = None,
        max_cpu_memory: MaxCpuMemory = None,
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result (clusters, errors) as JSON here."),
        mtp: MtpMode = "prune",
    ) -> None:
        """Merge experts (M-SMoE, HC-SMoE or averaging) into a smaller checkpoint that loads in stock transformers."""
        from ..errors import MoECompressError
        from ..merge import merge_checkpoint

        with user_errors():
            if mode not in ("chunk", "document"):
                raise MoECompressError(f"unknown --mode '{mode}'; use chunk or document")
            result = merge_checkpoint(model, output, keep=keep, method=method, calib=calib, stats=stats, n=n,
                                      seq_len=seq_len, seed=seed, linkage=linkage, metric=distance, router=router,
                                      refit=refit, ridge=ridge, overwrite=overwrite, dtype=dtype, device=device,
                                      batch_size=batch_size, field_name=field, calib_mode=mode,
                                      max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory, mtp=mtp)
        console.print(f"{result.method}, {result.num_experts} -> {result.keep} experts per MoE layer", highlight=False)
        console.print(_table(result))
        write_json(json_out, result.to_dict(with_time=False))
        console.print(f"wrote {output} ({result.seconds:.1f} s)", highlight=False)
