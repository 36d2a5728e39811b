"""``moecompress quantize MODEL -o OUT``: quantize the experts (flags mirror ``QuantizeOptions``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..quantize.options import QuantizeOptions
from ._common import console, user_errors, write_json

_F = QuantizeOptions.model_fields


def _help(name: str) -> str:
    return _F[name].description or ""


def _table(result) -> Table:
    t = Table(title=f"{result.options['quantizer']} quantization of the experts ({result.options['granularity']})")
    for col in ("layer", "width", "experts by width", "round-to-nearest fallbacks"):
        t.add_column(col, justify="right" if col != "experts by width" else "left")
    fb = {}
    for f in result.fallbacks:
        fb[f["layer"]] = fb.get(f["layer"], 0) + 1
    for li, ws in result.widths.items():
        counts = {}
        for w in ws:
            counts[w] = counts.get(w, 0) + 1
        shown = ", ".join(f"{w}: {c}" for w, c in sorted(counts.items(), key=lambda kv: str(kv[0])))
        t.add_row(str(li), str(result.layer_widths()[li]), shown, str(fb.get(li, 0)))
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id."),
        output: Path = typer.Option(..., "-o", "--output", help="Folder for the quantized checkpoint."),
        bits: Optional[float] = typer.Option(None, "--bits", help=_help("bits")),
        granularity: str = typer.Option("uniform", "--granularity", help=_help("granularity")),
        candidates: str = typer.Option("2,3,4,8", "--candidates", help=_help("candidates") + " Comma-separated."),
        allocation: str = typer.Option("mc-moe", "--allocation", help=_help("allocation")),
        alpha: float = typer.Option(1.0, "--alpha", help=_help("alpha")),
        beta: float = typer.Option(1.5, "--beta", help=_help("beta")),
        quantizer: str = typer.Option("gptq", "--quantizer", help=_help("quantizer")),
        group_size: int = typer.Option(128, "--group-size", help=_help("group_size")),
        symmetric: bool = typer.Option(True, "--symmetric/--asymmetric", help=_help("symmetric")),
        format: str = typer.Option("compressed-tensors", "--format", help=_help("format")),
        scheme: Optional[str] = typer.Option(None, "--scheme", help=_help("scheme")),
        non_expert_bits: int = typer.Option(16, "--non-expert-bits", help=_help("non_expert_bits")),
        damp: float = typer.Option(0.01, "--damp", help=_help("damp")),
        calibrate_all_experts: bool = typer.Option(False, "--calibrate-all-experts", help=_help("calibrate_all_experts")),
        min_tokens: int = typer.Option(0, "--min-tokens", help=_help("min_tokens")),
        loss_tokens: int = typer.Option(8192, "--loss-tokens", help=_help("loss_tokens")),
        calib: str = typer.Option("python_docs", "--calib", help=_help("calib")),
        n: int = typer.Option(64, "-n", help=_help("n")),
        seq_len: int = typer.Option(512, "--seq-len", help=_help("seq_len")),
        seed: int = typer.Option(0, "--seed", help=_help("seed")),
        mode: str = typer.Option("chunk", "--mode", help=_help("mode")),
        field: str = typer.Option("text", "--field", help=_help("field")),
        batch_size: int = typer.Option(8, "--batch-size", help=_help("batch_size")),
        dtype: str = typer.Option("auto", "--dtype", help=_help("dtype")),
        device: Optional[str] = typer.Option(None, "--device", help=_help("device")),
        max_gpu_memory: Optional[str] = typer.Option(None, "--max-gpu-memory", help=_help("max_gpu_memory")),
        max_cpu_memory: Optional[str] = typer.Option(None, "--max-cpu-memory", help=_help("max_cpu_memory")),
        overwrite: bool = typer.Option(False, "--overwrite", help=_help("overwrite")),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
    ) -> None:
        """Quantize the experts (GPTQ or RTN; uniform, per-layer or MC-MoE per-expert widths) into a
        compressed-tensors checkpoint that transformers and vLLM load, or a fake-quantized one."""
        from ..errors import MoECompressError
        from ..quantize import quantize_checkpoint

        with user_errors():
            try:
                cands = [int(c) for c in candidates.split(",") if c.strip()]
            except ValueError:
                raise MoECompressError(f"--candidates takes comma-separated widths like 2,3,4,8, got '{candidates}'") from None
            opts = dict(bits=bits, granularity=granularity, candidates=cands, allocation=allocation, alpha=alpha,
                        beta=beta, quantizer=quantizer, group_size=group_size, symmetric=symmetric, format=format,
                        scheme=scheme, non_expert_bits=non_expert_bits, damp=damp,
                        calibrate_all_experts=calibrate_all_experts, min_tokens=min_tokens, loss_tokens=loss_tokens,
                        calib=calib, n=n, seq_len=seq_len, seed=seed, mode=mode, field=field, batch_size=batch_size,
                        dtype=dtype, device=device, max_gpu_memory=max_gpu_memory, max_cpu_memory=max_cpu_memory,
                        overwrite=overwrite)
            result = quantize_checkpoint(model, output, **opts)
        console.print(_table(result))
        d = result.to_dict(with_time=False)
        console.print(f"{d['average_bits']:.3f} bits per expert weight (weights {result.average_width:.3f} + scales"
                      f"{'' if result.options['symmetric'] else ' + zero points'}), experts {d['expert_bytes'] / 2**20:.2f} MiB; "
                      f"wrote {output} in {result.seconds:.1f} s", highlight=False)
        write_json(json_out, d)
