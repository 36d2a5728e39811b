"""Option groups that several stages share, declared once: calibration, loading, streaming, output."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import field_validator

from .base import Options, option

# The calibration sample every stage draws unless told otherwise: 64 sequences of 512 tokens
# (the only place these numbers are written; calibration.py and eval use these constants).
DEFAULT_CALIB = "python_docs"
DEFAULT_N = 64
DEFAULT_SEQ_LEN = 512
DTYPES = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]


def _checked(check, v):
    """Run a library check inside a validator: its message becomes the field's error."""
    from ..errors import MoECompressError

    try:
        check(v)
    except MoECompressError as e:
        raise ValueError(str(e)) from None
    return v


class CalibrationOptions(Options):
    calib: str = option(DEFAULT_CALIB, "Calibration .txt/.jsonl/.parquet, a shipped set (python_docs, python_code, "
                        "numpy_docs) or a Hub dataset org/name[:split]; domain text compresses for that domain.")
    n: int = option(DEFAULT_N, "Number of calibration sequences.", flags=("-n",), ge=1)
    seq_len: int = option(DEFAULT_SEQ_LEN, "Tokens per calibration sequence.", ge=2)
    seed: int = option(0, "Seed of the calibration sample (and of seeded methods).", ge=0)
    field: str = option("text", "Text field of .jsonl / column of .parquet / Hub datasets.")
    mode: Literal["chunk", "document"] = option("chunk", "chunk: concatenate and cut; document: one sequence per "
                                                "document.")
    batch_size: Optional[int] = option(None, "Calibration sequences per forward pass (default: 8 on the CPU; on a GPU "
                                       "as many as make ~16k tokens; a prune streamed onto a GPU as many as 30% of "
                                       "--max-gpu-memory holds, else 8 when streaming).", ge=1)

    def calibration(self) -> dict:
        """Keyword arguments of :func:`moecompress.calibration.load_calibration`."""
        return {"n": self.n, "seq_len": self.seq_len, "seed": self.seed, "mode": self.mode, "field": self.field}

    def resolved_batch_size(self, device: str | None, streamed: bool, config=None) -> int:
        """--batch-size, else: 8 on the CPU; on a GPU ~16k tokens; streamed onto a GPU, 8, or
        with ``config`` (the stages whose streamed peak was measured: prune) as many as the
        cap's activation share holds (``checkpoint.streamed_batch_size``), at most the GPU's."""
        from ..stats.api import default_batch_size

        if self.batch_size:
            return self.batch_size
        if streamed and config is not None:
            import torch

            if torch.cuda.is_available():  # load_model streams onto the GPU
                from ..checkpoint import streamed_batch_size

                return min(default_batch_size(self.seq_len, self.n, on_gpu=True),
                           streamed_batch_size(config, getattr(self, "max_gpu_memory", None), self.seq_len, self.n))
        on_gpu = not (device is None or str(device) == "cpu") and not streamed
        return default_batch_size(self.seq_len, self.n, on_gpu=on_gpu)

    @field_validator("calib")
    @classmethod
    def _calib_exists(cls, v: str) -> str:
        from ..calibration import check_source

        return _checked(check_source, v)


class LoadingOptions(Options):
    dtype: DTYPES = option("auto", "Compute dtype: auto = float32 on the CPU, the checkpoint's dtype on a GPU. "
                           "Outputs keep the checkpoint's dtype.")
    device: Optional[str] = option(None, "cpu, cuda, cuda:1 ... (default: auto: the GPU when there is one, streamed "
                                   "when the model does not fit it, else the CPU; one line says which).")


class StreamingOptions(Options):
    max_gpu_memory: Optional[str] = option(None, "Stream the model under this GPU memory cap (e.g. 4GiB): layers are "
                                           "onloaded one at a time while they run.")
    max_cpu_memory: Optional[str] = option(None, "CPU memory cap when streaming; the rest is offloaded to disk "
                                           "(e.g. 32GiB).")

    @field_validator("max_gpu_memory", "max_cpu_memory")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        from ..checkpoint import parse_memory

        return _checked(parse_memory, v)

    @property
    def streamed(self) -> bool:
        return self.max_gpu_memory is not None or self.max_cpu_memory is not None


class OutputOptions(Options):
    # A recipe decides where each stage writes (and `run --overwrite` replaces its output).
    overwrite: bool = option(False, "Replace an existing output.", recipe=False)
    json_out: Optional[Path] = option(None, "Also write the result as JSON here ('-' = stdout).", flags=("--json",),
                                      library=False, recipe=False)


class MtpOptions(Options):
    mtp: Literal["prune", "drop"] = option("prune", "Multi-token-prediction layers the checkpoint stores "
                                           "(num_nextn_predict_layers): prune (their experts, chosen by their own "
                                           "router on the calibration text) or drop (remove them; "
                                           "num_nextn_predict_layers 0).")


class RepairOptions(Options):
    """The repair after expert removal (prune and merge; moecompress/repair.py, moecompress/blocktune.py)."""

    repair_target: Literal["both", "stream", "layer"] = option(
        "both", "What the repair's re-fit reproduces (merge: with --repair): stream (the original model's hidden "
        "states after each layer, so drift from earlier layers is corrected too; GPTAQ's asymmetric target), layer "
        "(the original MoE layer on the compressed model's inputs), or both (the two least-squares objectives "
        "summed).")
    tune_epochs: int = option(4, "--repair refit+tune: epochs over the calibration tokens per layer (the epoch "
                              "with the least held-out error is kept, 0 = the closed-form fit).", ge=1)
    tune_lr: float = option(1e-3, "--repair refit+tune: Adam learning rate.", gt=0)
