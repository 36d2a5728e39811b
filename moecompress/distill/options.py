"""Every option of ``moecompress distill``, declared once (pydantic): the Typer command, the
library function :func:`moecompress.distill.distill_checkpoint` and a recipe stage all read
this model, so names, defaults, ranges and help cannot drift apart (issue 15's design: one
options model per stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import MoECompressError

_TRAIN = "Training"
_LOSS = "Loss"
_STAGES = "Staged slimming (SlimMoE)"
_RUN = "Checkpoints, evaluation, hardware"


def _opt(default, help: str, *, panel: str | None = None, flags: tuple[str, ...] = (), **rng):
    return Field(default, description=help, json_schema_extra={"panel": panel, "flags": list(flags)}, **rng)


class DistillOptions(BaseModel):
    """Options of knowledge distillation of a compressed student from its teacher."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # ----- data ---------------------------------------------------------------------------
    field: str = _opt("text", "Text field of .jsonl / column of .parquet / Hub datasets (--data).")
    mode: Literal["chunk", "document"] = _opt("chunk", "chunk: concatenate and cut; document: one sequence per "
                                              "document.")
    seq_len: int = _opt(512, "Tokens per training sequence.", ge=2)
    batch_size: int = _opt(8, "Sequences per micro-batch, over all processes (split between them).", ge=1)
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (gradient accumulation).", ge=1,
                           flags=("--grad-accum",), panel=_TRAIN)
    # ----- length -------------------------------------------------------------------------
    steps: Optional[int] = _opt(None, "Optimizer steps (default 100 without --tokens; with --stages each stage "
                                "says its own).", ge=0, panel=_TRAIN)
    tokens: Optional[int] = _opt(None, "Train on this many tokens instead of --steps.", ge=1, panel=_TRAIN)
    # ----- optimisation -------------------------------------------------------------------
    lr: float = _opt(1e-4, "Peak learning rate.", gt=0, panel=_TRAIN)
    lr_schedule: Literal["cosine", "linear", "constant"] = _opt("cosine", "Decay after warm-up (to 10% of --lr "
                                                                "for cosine, 0 for linear).", panel=_TRAIN)
    warmup: float = _opt(0.05, "Warm-up steps as a fraction of each stage's steps.", ge=0, lt=1, panel=_TRAIN)
    weight_decay: float = _opt(0.0, "AdamW weight decay.", ge=0, panel=_TRAIN)
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 = off).", ge=0, panel=_TRAIN)
    optim: Literal["adamw", "adamw8bit"] = _opt("adamw", "adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW, "
                                                "CUDA only).", panel=_TRAIN)
    train: Literal["experts", "experts+router", "all"] = _opt("all", "Which student weights train.", panel=_TRAIN)
    seed: int = _opt(0, "Seed of data order, calibration samples and initialisation.", ge=0)
    # ----- loss ---------------------------------------------------------------------------
    loss: Literal["kl", "kl+hidden"] = _opt("kl", "kl: KL(teacher || student) of the next-token distribution; "
                                            "kl+hidden adds the hidden-state MSE of every decoder layer.", panel=_LOSS)
    top_k_logits: Optional[int] = _opt(None, "KL over the teacher's top-K logits only (SlimMoE uses 8); default: "
                                       "the full vocabulary.", ge=1, panel=_LOSS)
    temperature: float = _opt(1.0, "Softmax temperature of the KL (the loss is scaled by T^2).", gt=0, panel=_LOSS)
    hidden_weight: float = _opt(1.0, "Weight of the hidden-state term (relative MSE) with --loss kl+hidden.", ge=0,
                                panel=_LOSS)
    ce_weight: float = _opt(0.0, "Weight of the plain next-token cross-entropy added to the KL.", ge=0, panel=_LOSS)
    expert_wise_steps: int = _opt(0, "MoE-Pruner's expert-wise distillation first: this many Adam steps per MoE "
                                  "layer regressing the student block's output on the teacher's (0 = off).", ge=0,
                                  panel=_LOSS)
    expert_wise_lr: float = _opt(1e-4, "Learning rate of the expert-wise regression.", gt=0, panel=_LOSS)
    # ----- stages -------------------------------------------------------------------------
    stages: Optional[str] = _opt(None, "SlimMoE staged slimming, e.g. 'heapr:0.25,steps:200; heapr:0.5,steps:400' "
                                 "or 'keep:24,steps:200; keep:16,steps:400' (heapr: fraction of the ORIGINAL "
                                 "expert neurons removed; keep/ratio: experts; merge: experts merged to N; "
                                 "method:NAME picks the pruning method). The input model is the teacher.",
                                 panel=_STAGES)
    calib_n: int = _opt(64, "Sequences of the training data that each stage's pruning calibrates on.", ge=1,
                        flags=("--calib-n",), panel=_STAGES)
    # ----- evaluation, checkpoints, hardware ----------------------------------------------
    eval: list[Path] = _opt([], "Held-out text file for validation perplexity (repeatable).", panel=_RUN)
    eval_every: int = _opt(0, "Validation perplexity every N steps (0 = before and after training only).", ge=0,
                           panel=_RUN)
    eval_tokens: int = _opt(20_000, "Score the first N tokens of each --eval file.", ge=1, panel=_RUN)
    eval_seq_len: int = _opt(512, "Perplexity window length.", ge=2, panel=_RUN)
    checkpoint_every: int = _opt(0, "Save the full training state every N steps (0 = never).", ge=0, panel=_RUN)
    checkpoint_dir: Optional[Path] = _opt(None, "Folder of the training checkpoints (default: OUT.checkpoints).",
                                          panel=_RUN)
    resume: bool = _opt(False, "Continue from the newest checkpoint exactly (weights, optimizer, RNG, data "
                        "position).", panel=_RUN)
    stop_after: Optional[int] = _opt(None, "Stop after this many optimizer steps of this run, leaving a "
                                     "checkpoint and no output (for jobs with a time limit).", ge=1, panel=_RUN)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _opt("auto", "auto: bf16 on a GPU that has it, no "
                                                                  "(fp32) on the CPU.", panel=_RUN)
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass (less memory).",
                                        panel=_RUN)
    cpu: bool = _opt(False, "Train on the CPU even if a GPU is present.", panel=_RUN)
    log_every: int = _opt(1, "Loss-curve point every N steps.", ge=1, panel=_RUN)
    overwrite: bool = _opt(False, "Replace an existing output folder.")

    @field_validator("eval")
    @classmethod
    def _eval_files(cls, v: list[Path]) -> list[Path]:
        for p in v:
            if not Path(p).expanduser().is_file():
                raise ValueError(f"evaluation text '{p}' not found; pass a UTF-8 text file")
        return v

    @field_validator("stages")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is not None:
            from .stages import parse_stages

            try:
                parse_stages(v)
            except MoECompressError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _length(self):
        if self.steps is not None and self.tokens is not None:
            raise ValueError("give --steps or --tokens, not both")
        return self

    def total_steps(self) -> int:
        """Optimizer steps of a single-stage run."""
        if self.tokens is not None:
            per_step = self.batch_size * self.grad_accum * self.seq_len
            return max(1, -(-self.tokens // per_step))
        return 100 if self.steps is None else self.steps


def validate(values: dict) -> DistillOptions:
    """``DistillOptions(**values)`` or a one-line :class:`MoECompressError` naming the option."""
    try:
        return DistillOptions.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"]) or "options"
        flag = "--" + key.replace("_", "-") if key in DistillOptions.model_fields else key
        if err["type"] == "extra_forbidden":
            raise MoECompressError(f"unknown distill option '{key}'; options: "
                                   f"{', '.join(DistillOptions.model_fields)}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise MoECompressError(f"{flag}: {msg}" + ("" if "got" in msg else f" (got {err.get('input')!r})")) from None
