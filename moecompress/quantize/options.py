"""Every option of ``moecompress quantize``, declared once (one pydantic model): the library
entry points validate through it and the command's flags are written from it."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMES = {"w4a16": 4, "w8a16": 8, "fp8": "fp8"}


class QuantizeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ----- what is computed
    bits: Optional[float] = Field(None, ge=1, le=8, description="Target average expert weight width (expert / layer "
                                  "granularity); the budget is the honest size of every expert at this width, scales "
                                  "and zero points included. Uniform: the width itself (default: the scheme's).")
    granularity: Literal["uniform", "layer", "expert"] = Field(
        "uniform", description="uniform: one width; layer: one width per MoE layer (what compressed-tensors engines "
        "serve); expert: one width per expert (MC-MoE as published; --format fake only).")
    candidates: list[int] = Field([2, 3, 4, 8], description="Widths the allocation chooses from (layer / expert).")
    allocation: Literal["mc-moe", "frequency", "random"] = Field(
        "mc-moe", description="mc-moe: MC-MoE's integer program (frequency^alpha x weight^beta x output loss); "
        "frequency: the paper's frequency-only ablation; random: seeded baseline with the same budget.")
    alpha: float = Field(1.0, ge=0, description="MC-MoE exponent of the activation frequency.")
    beta: float = Field(1.5, ge=0, description="MC-MoE exponent of the activation weight.")
    quantizer: Literal["gptq", "rtn"] = Field("gptq", description="gptq (calibrated, layer by layer) or rtn "
                                              "(round to nearest, no calibration).")
    group_size: int = Field(128, ge=0, description="Input columns per scale (0 = one scale per output channel).")
    symmetric: bool = Field(True, description="Symmetric grid (no zero point) or asymmetric.")
    format: Literal["compressed-tensors", "fake"] = Field(
        "compressed-tensors", description="compressed-tensors: packed int / FP8 checkpoint that transformers and vLLM "
        "load; fake: dequantized weights in the checkpoint dtype plus the bit map (research allocations).")
    scheme: Optional[Literal["w4a16", "w8a16", "fp8"]] = Field(
        None, description="compressed-tensors scheme of a uniform run (w4a16, w8a16, fp8 per channel).")
    non_expert_bits: Literal[16, 8, 4] = Field(16, description="Attention, shared-expert and dense MLP weights: 16 "
                                               "(untouched), 8 or 4 (round to nearest, same group size).")
    damp: float = Field(0.01, gt=0, description="GPTQ dampening (fraction of the mean Hessian diagonal).")
    calibrate_all_experts: bool = Field(False, description="GPTQ: every calibration token into every expert's "
                                        "Hessian (only routed outputs propagate).")
    min_tokens: int = Field(0, ge=0, description="GPTQ: experts routed fewer tokens fall back to round to nearest "
                            "(default: the number of input columns, so the Hessian can have full rank).")
    loss_tokens: int = Field(8192, ge=1, description="Calibration tokens per layer on which MC-MoE's output loss "
                             "is measured.")
    # ----- calibration, loading, output (the names every stage uses)
    calib: str = Field("python_docs", description="Calibration text (.txt/.jsonl/.parquet, a shipped set or a Hub "
                       "dataset); needed by gptq and by the allocation.")
    n: int = Field(64, ge=1, description="Number of calibration sequences.")
    seq_len: int = Field(512, ge=2, description="Tokens per calibration sequence.")
    seed: int = Field(0, ge=0, description="Seed of the calibration sample and of random allocations.")
    field: str = Field("text", description="Text field of .jsonl / column of .parquet / Hub datasets.")
    mode: Literal["chunk", "document"] = Field("chunk", description="chunk: concatenate and cut; document: one "
                                               "sequence per document.")
    batch_size: int = Field(8, ge=1, description="Calibration sequences per forward pass.")
    dtype: str = Field("auto", description="Compute dtype: auto = float32 on the CPU, the checkpoint's on a GPU.")
    device: Optional[str] = Field(None, description="cpu, cuda, cuda:1 ... (default: cpu).")
    max_gpu_memory: Optional[str] = Field(None, description="Stream the model under this GPU memory cap (e.g. 4GiB).")
    max_cpu_memory: Optional[str] = Field(None, description="CPU memory cap when streaming (e.g. 32GiB).")
    overwrite: bool = Field(False, description="Replace an existing output folder.")
    progress: bool = Field(True, description="Show progress bars.")

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= b <= 8 for b in v):
            raise ValueError("candidate widths must be integers from 1 to 8")
        return sorted(set(v))

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeOptions":
        if self.granularity == "expert" and self.format != "fake":
            raise ValueError("--granularity expert needs --format fake: no serving engine runs different widths "
                             "inside one MoE layer (vLLM reads expert 0's scheme, transformers one group for all)")
        if self.scheme is not None and self.granularity != "uniform":
            raise ValueError("--scheme sets one width for all experts; drop it for --granularity layer/expert")
        if self.granularity != "uniform" and self.bits is None:
            raise ValueError(f"--granularity {self.granularity} needs --bits (the target average width)")
        if self.granularity != "uniform" and self.bits is not None and not (
                self.candidates[0] <= self.bits <= self.candidates[-1]):
            raise ValueError(f"--bits {self.bits:g} is outside the candidate widths {self.candidates}")
        if self.granularity == "uniform" and self.bits is not None:
            if self.bits != int(self.bits):
                raise ValueError("uniform quantization needs a whole --bits width (fractional averages need "
                                 "--granularity layer or expert)")
            if self.scheme is not None and SCHEMES[self.scheme] != int(self.bits):
                raise ValueError(f"--bits {self.bits:g} contradicts --scheme {self.scheme}")
        if self.scheme == "fp8" and self.quantizer == "gptq":
            self.quantizer = "rtn"  # FP8 per channel needs no calibration (the contract)
        return self

    # ----- derived
    def uniform_width(self):
        """The single width of a uniform run: the scheme's, else ``bits``, else 4."""
        if self.scheme is not None:
            return SCHEMES[self.scheme]
        return int(self.bits) if self.bits is not None else 4

    @property
    def needs_calibration(self) -> bool:
        return self.quantizer == "gptq" or self.granularity != "uniform"
