"""Options of ``moecompress distill`` (issue 14): knowledge distillation of a compressed student
from its teacher, and SlimMoE's staged slimming. One model, from which the command's flags, the
signature of :func:`moecompress.distill.distill_checkpoint` and the recipe stage are made."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import field_validator, model_validator

from .base import Options, option
from .groups import OutputOptions, _checked

_TRAIN = "Training"
_LOSS = "Loss"
_STAGES = "Staged slimming (SlimMoE)"
_RUN = "Checkpoints, evaluation, hardware"


class DistillOptions(OutputOptions):
    """Options of knowledge distillation of a compressed student from its teacher."""

    teacher: Optional[str] = option(None, "The uncompressed model (default with --stages: the input model itself; "
                                    "in a recipe: the recipe's model).")
    data: str = option(..., "Training text: what --calib takes (.txt/.jsonl/.parquet, a shipped set, a Hub dataset "
                       "org/name[:split]).")
    # ----- data ---------------------------------------------------------------------------
    field: str = option("text", "Text field of .jsonl / column of .parquet / Hub datasets (--data).")
    mode: Literal["chunk", "document"] = option("chunk", "chunk: concatenate and cut; document: one sequence per "
                                                "document.")
    seq_len: int = option(512, "Tokens per training sequence.", ge=2)
    batch_size: int = option(8, "Sequences per micro-batch, over all processes (split between them).", ge=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step (gradient accumulation).", ge=1,
                             flags=("--grad-accum",), panel=_TRAIN)
    # ----- length -------------------------------------------------------------------------
    steps: Optional[int] = option(None, "Optimizer steps (default 100 without --tokens; with --stages each stage "
                                  "says its own).", ge=0, panel=_TRAIN)
    tokens: Optional[int] = option(None, "Train on this many tokens instead of --steps.", ge=1, panel=_TRAIN)
    # ----- optimisation -------------------------------------------------------------------
    lr: float = option(1e-4, "Peak learning rate.", gt=0, panel=_TRAIN)
    lr_schedule: Literal["cosine", "linear", "constant"] = option("cosine", "Decay after warm-up (to 10% of --lr "
                                                                  "for cosine, 0 for linear).", panel=_TRAIN)
    warmup: float = option(0.05, "Warm-up steps as a fraction of each stage's steps.", ge=0, lt=1, panel=_TRAIN)
    weight_decay: float = option(0.0, "AdamW weight decay.", ge=0, panel=_TRAIN)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = off).", ge=0, panel=_TRAIN)
    optim: Literal["adamw", "adamw8bit"] = option("adamw", "adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW, "
                                                  "CUDA only).", panel=_TRAIN)
    train: Literal["experts", "experts+router", "all"] = option("all", "Which student weights train.", panel=_TRAIN)
    seed: int = option(0, "Seed of data order, calibration samples and initialisation.", ge=0)
    # ----- loss ---------------------------------------------------------------------------
    loss: Literal["kl", "kl+hidden"] = option("kl", "kl: KL(teacher || student) of the next-token distribution; "
                                              "kl+hidden adds the hidden-state MSE of every decoder layer.",
                                              panel=_LOSS)
    top_k_logits: Optional[int] = option(None, "KL over the teacher's top-K tokens plus one 'any other token' "
                                         "outcome (SlimMoE uses 8); default: the full vocabulary.", ge=1, panel=_LOSS)
    temperature: float = option(1.0, "Softmax temperature of the KL (the loss is scaled by T^2).", gt=0, panel=_LOSS)
    hidden_weight: float = option(1.0, "Weight of the hidden-state term (relative MSE) with --loss kl+hidden.", ge=0,
                                  panel=_LOSS)
    ce_weight: float = option(0.0, "Weight of the plain next-token cross-entropy added to the KL.", ge=0, panel=_LOSS)
    expert_wise_steps: int = option(0, "MoE-Pruner's expert-wise distillation first: this many Adam steps per MoE "
                                    "layer regressing the student block's output on the teacher's (0 = off).", ge=0,
                                    panel=_LOSS)
    expert_wise_lr: float = option(1e-4, "Learning rate of the expert-wise regression.", gt=0, panel=_LOSS)
    # ----- stages -------------------------------------------------------------------------
    stages: Optional[str] = option(None, "SlimMoE staged slimming, e.g. 'heapr:0.25,steps:200; heapr:0.5,steps:400' "
                                   "or 'keep:24,steps:200; keep:16,steps:400' (heapr: fraction of the ORIGINAL "
                                   "expert neurons removed; keep/ratio: experts; merge: experts merged to N; "
                                   "method:NAME picks the pruning method). The input model is the teacher.",
                                   panel=_STAGES)
    calib_n: int = option(64, "Sequences of the training data that each stage's pruning calibrates on.", ge=1,
                          flags=("--calib-n",), panel=_STAGES)
    # ----- evaluation, checkpoints, hardware ----------------------------------------------
    eval: list[Path] = option([], "Held-out text file for validation perplexity (repeatable).", panel=_RUN)
    eval_every: int = option(0, "Validation perplexity every N steps (0 = before and after training only).", ge=0,
                             panel=_RUN)
    eval_tokens: int = option(20_000, "Score the first N tokens of each --eval file.", ge=1, panel=_RUN)
    eval_seq_len: int = option(512, "Perplexity window length.", ge=2, panel=_RUN)
    checkpoint_every: int = option(0, "Save the full training state every N steps (0 = never).", ge=0, panel=_RUN)
    checkpoint_dir: Optional[Path] = option(None, "Folder of the training checkpoints (default: OUT.checkpoints).",
                                            panel=_RUN)
    resume: bool = option(False, "Continue from the newest checkpoint exactly (weights, optimizer, RNG, data "
                          "position).", panel=_RUN)
    stop_after: Optional[int] = option(None, "Stop after this many optimizer steps of this run, leaving a "
                                       "checkpoint and no output (for jobs with a time limit).", ge=1, panel=_RUN)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option("auto", "auto: bf16 on a GPU that has it, no "
                                                                    "(fp32) on the CPU.", panel=_RUN)
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass (less memory).",
                                          panel=_RUN)
    cpu: bool = option(False, "Train on the CPU even if a GPU is present.", panel=_RUN)
    log_every: int = option(1, "Loss-curve point every N steps.", ge=1, panel=_RUN)
    cache_teacher: bool = option(False, "Run the teacher once before training and keep what the loss needs on disk "
                                 "(--teacher-cache-dir), then train without the teacher in memory; later runs with "
                                 "the same teacher, data, seed and batch reuse it.", panel=_RUN)
    teacher_cache_dir: Optional[Path] = option(None, "Folder of the --cache-teacher cache (default: "
                                               "OUT.teacher-cache; kept after the run).", panel=_RUN)
    teacher_cache_max_gib: float = option(64.0, "Refuse a --cache-teacher cache larger than this (GiB); full-"
                                          "vocabulary logits are large, --top-k-logits K is ~8K bytes a token.",
                                          gt=0, panel=_RUN)

    @field_validator("eval")
    @classmethod
    def _eval_files(cls, v: list[Path]) -> list[Path]:
        for p in v:
            if not Path(p).expanduser().is_file():
                raise ValueError(f"evaluation text '{p}' not found; pass a UTF-8 text file")
        return v

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        from ..calibration import check_source

        return _checked(check_source, v)

    @field_validator("stages")
    @classmethod
    def _schedule(cls, v: str | None) -> str | None:
        if v is not None:
            from ..distill.stages import parse_stages

            _checked(parse_stages, v)
        return v

    def experts_after(self, num_experts: int) -> int | None:
        # with --stages the student is slimmed as the run goes (distill.stages checks each step)
        return None if self.stages else num_experts

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
