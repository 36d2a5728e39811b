"""Library entry of the distill stage: :func:`distill_checkpoint`.

Knowledge distillation of a compressed student from its teacher (the uncompressed model), or,
with ``stages``, SlimMoE's staged slimming of a model with itself as the teacher
(:mod:`.stages`). All input checks run before any model is loaded.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MoECompressError
from ..options import DistillOptions, library_function
from .stages import Stage, apply_stage, parse_stages
from .teacher import LiveTeacher, TeacherModel, build_cache, cache_key, check_size, estimate_bytes
from .trainer import CONFIG_DIR, Evaluator, TrainState, checkpoints, make_accelerator, record_eval, train_stage


@dataclass
class DistillResult:
    output: str | None  # None when --stop-after stopped the run (a checkpoint holds it)
    steps: int
    tokens: int
    schedule: list[str]
    first_loss: float | None
    last_loss: float | None
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    data_sha256: str = ""
    seconds: float = 0.0  # training wall time (over resumes)
    num_processes: int = 1
    stopped: bool = False
    stages: list = field(default_factory=list)
    teacher_cache: dict | None = None  # --cache-teacher: folder, micro-batches built/reused, bytes, seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "tokens_per_s": round(self.tokens_per_s, 1)}


def _check_inputs(student, teacher, data, out, opts: DistillOptions) -> tuple[str, list[Stage]]:
    from ..arch import family_for_config
    from ..calibration import check_source
    from ..checkpoint import load_config
    from ..formats import require_rewritable

    s_cfg = load_config(student)
    family_for_config(s_cfg)
    require_rewritable(s_cfg, student, "distillation")
    if teacher is None:
        if not opts.stages:
            raise MoECompressError("distillation needs a teacher: pass --teacher (the uncompressed model), or --stages "
                                   "to slim the model with itself as the teacher")
        teacher = student
    t_cfg = load_config(teacher)
    family_for_config(t_cfg)
    if t_cfg.vocab_size != s_cfg.vocab_size:
        raise MoECompressError(f"teacher and student vocabularies differ ({t_cfg.vocab_size} vs {s_cfg.vocab_size}); "
                               "distil from the model the student was compressed from")
    check_source(data)
    if opts.stages and (opts.steps is not None or opts.tokens is not None):
        raise MoECompressError("with --stages every stage gives its own steps (steps:N); drop --steps/--tokens")
    stages = parse_stages(opts.stages) if opts.stages else [Stage(None, None, opts.total_steps())]
    o = Path(out).expanduser()
    if o.exists() and not opts.overwrite and not opts.resume:
        raise MoECompressError(f"output '{out}' exists; pass --overwrite to replace it")
    return str(teacher), stages


@library_function(DistillOptions)
def distill_checkpoint(student: str | os.PathLike, out: str | os.PathLike, *, opts: DistillOptions,
                       progress: bool = True) -> DistillResult:
    """Distil ``student`` from ``teacher`` on ``data`` and write a standard checkpoint of the
    student's shape to ``out`` (with ``moecompress.json`` and ``loss_curve.json``/``.png``).

    Options: :class:`moecompress.options.DistillOptions` as keyword arguments (or a ready
    ``options=``). The same call works under ``accelerate launch`` with several processes
    (DDP): every process holds a teacher and a student, each takes its slice of every global
    batch, and only the main process writes. With ``cache_teacher`` the teacher runs once over
    every micro-batch first, its records go to disk (:mod:`.teacher`) and training reads them
    with the teacher out of memory.
    """
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..calibration import load_sequences
    from ..checkpoint import load_model, output_folder, resolve_source, save_model, stored_dtype
    from ..source import load_tokenizer
    from .curve import write_curve
    from .data import BatchOrder, calibration_sample
    from .expertwise import expert_wise_distill

    data = opts.data
    teacher, stages = _check_inputs(student, opts.teacher, data, out, opts)
    accelerator = make_accelerator(opts)
    on_cpu = accelerator.device.type == "cpu"
    if opts.optim == "adamw8bit" and on_cpu:
        raise MoECompressError("--optim adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW); use --optim adamw on "
                               "the CPU")
    ckpt_root = Path(opts.checkpoint_dir or f"{Path(out).expanduser()}.checkpoints")
    resume_from = None
    if opts.resume:
        found = checkpoints(ckpt_root)
        if not found:
            raise MoECompressError(f"--resume: no checkpoint in '{ckpt_root}'; run without --resume to start")
        resume_from = found[-1]
    set_seed(opts.seed)
    device = str(accelerator.device)
    tokenizer = load_tokenizer(resolve_source(student), str(student))
    tokens = load_sequences(tokenizer, data, opts.seq_len, opts.mode, opts.field)
    # The teacher computes in its stored dtype on a GPU (bf16 halves its memory), fp32 on the CPU;
    # the student's master weights are fp32 and mixed precision autocasts its forward.
    t_config = AutoConfig.from_pretrained(resolve_source(teacher))
    t_dtype = torch.float32 if on_cpu else (stored_dtype(t_config) or torch.float32)
    teacher_model = TeacherModel(teacher, t_dtype, device)
    state = TrainState.load(resume_from) if resume_from is not None else TrainState()
    order = BatchOrder(tokens.shape[0], opts.batch_size, opts.seed)
    bar = _progress(progress and accelerator.is_main_process)
    cache_info = None
    with bar:
        if opts.cache_teacher:
            teacher_fn, cache_info = _teacher_cache(teacher, t_config, t_dtype, teacher_model, tokens, order, stages,
                                                    state, out, opts, accelerator, bar)
            teacher_model.free()  # training reads the cache: the teacher leaves memory
        else:
            teacher_fn = LiveTeacher(teacher_model.get(), opts, accelerator)
        set_seed(opts.seed)  # the same RNG state whether or not the teacher was loaded and run
        if resume_from is not None:
            cfg = AutoConfig.from_pretrained(resume_from / CONFIG_DIR)
            student_model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(device)  # load_state
        else:
            student_model = load_model(student, dtype=torch.float32, device=device)
        original_experts, original_inter = _shape(t_config, teacher_model.model)
        calib = calibration_sample(tokens, opts.calib_n, opts.seed)
        evaluator = Evaluator(tokenizer, opts.eval, opts) if opts.eval else None
        if evaluator is not None and resume_from is None and not opts.stages:
            record_eval(accelerator, student_model, evaluator, state)
        budget = [opts.stop_after] if opts.stop_after else None
        for si, stage in enumerate(stages):
            if si < state.stage:
                continue
            state.stage = si
            if not state.stage_done_cut:
                report = apply_stage(student_model, stage, calib.to(device), original_experts=original_experts,
                                     original_intermediate=original_inter, seed=opts.seed, progress=False)
                if opts.expert_wise_steps:
                    report["expert_wise"] = expert_wise_distill(
                        student_model, teacher_model.get(), calib, lr=opts.expert_wise_lr,
                        steps=opts.expert_wise_steps, train=opts.train)
                    if opts.cache_teacher:  # needed again only at the next stage's cut
                        teacher_model.free()
                state.stages.append({"stage": stage.describe(), **report})
                state.stage_done_cut = True
                if evaluator is not None and opts.stages:
                    record_eval(accelerator, student_model, evaluator, state)
            finished = train_stage(accelerator, student_model, teacher_fn, tokens, order, opts, steps=stage.steps,
                                   state=state, ckpt_root=ckpt_root, resume_from=resume_from, evaluator=evaluator,
                                   bar=bar, run_budget=budget)
            resume_from = None
            if not finished:
                return _result(None, state, stages, tokens, accelerator, stopped=True, cache=cache_info)
            state.stage_done_cut, state.step = False, 0
        state.stage = len(stages) - 1
        if evaluator is not None:
            record_eval(accelerator, student_model, evaluator, state)
    result = _result(str(out), state, stages, tokens, accelerator, cache=cache_info)
    if accelerator.is_main_process:
        stored = stored_dtype(AutoConfig.from_pretrained(resolve_source(student)))
        if stored is not None:
            student_model.to(stored)
        record = {"stage": "distill", "teacher": teacher, "seed": opts.seed,
                  "seeds": {"data_order": opts.seed, "calibration_sample": opts.seed, "torch": opts.seed},
                  "data": {"source": str(data), "sha256": result.data_sha256, "sequences": int(tokens.shape[0]),
                           "seq_len": opts.seq_len, "field": opts.field, "mode": opts.mode},
                  "steps": state.global_step, "tokens": state.tokens, "schedule": result.schedule,
                  "stages": state.stages,
                  "options": opts.model_dump(mode="json", exclude={"overwrite", "resume", "stop_after",
                                                                   "checkpoint_dir", "json_out"}),
                  "loss": {"first": result.first_loss, "last": result.last_loss},
                  "eval": {"before": result.eval_before, "after": result.eval_after},
                  "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                  "teacher_cache": cache_info}
        with output_folder(out, overwrite=opts.overwrite or opts.resume, source=student) as folder:
            save_model(student_model, folder, source=student, record=record)
            write_curve(folder, state, result.schedule)
        if opts.checkpoint_dir is None:
            shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()
    return result


def _teacher_cache(teacher, t_config, t_dtype, teacher_model, tokens, order, stages, state, out, opts, accelerator,
                   bar):
    """The teacher's records of every micro-batch this run trains on, on disk (``--cache-teacher``)."""
    from .data import data_hash

    folder = Path(opts.teacher_cache_dir or f"{out}.teacher-cache").expanduser()
    end = sum(s.steps for s in stages) * opts.grad_accum  # global micro-batches of the whole schedule
    micro = range(state.micro, end)
    text = t_config.get_text_config() if hasattr(t_config, "get_text_config") else t_config
    key = cache_key(teacher, data_hash(tokens), opts, vocab_size=text.vocab_size, processes=accelerator.num_processes,
                    mixed_precision=accelerator.mixed_precision, teacher_dtype=t_dtype,
                    device_type=accelerator.device.type)
    check_size(folder, estimate_bytes(t_config, opts, len(micro), mixed_precision=accelerator.mixed_precision,
                                      teacher_dtype=t_dtype), opts, text.vocab_size)
    started = time.perf_counter()
    cache, info = build_cache(folder, key, micro, tokens, order, opts, accelerator, teacher_model, bar)
    return cache, {**info, "seconds": round(time.perf_counter() - started, 3)}


def _shape(config, model=None) -> tuple[int, int]:
    """Experts per layer and expert intermediate size of the teacher: of ``model`` when it is
    loaded, else of a meta-device model of ``config`` (no weights: --cache-teacher)."""
    from transformers import AutoModelForCausalLM

    from ..arch import moe_view

    if model is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    view = moe_view(model)
    return view.num_experts, next(iter(view)).intermediate_size


def _result(out, state: TrainState, stages: list[Stage], tokens: torch.Tensor, accelerator, stopped: bool = False,
            cache: dict | None = None):
    from .data import data_hash

    evals = state.evals
    return DistillResult(
        output=out, steps=state.global_step, tokens=state.tokens, schedule=[s.describe() for s in stages],
        first_loss=state.curve[0]["loss"] if state.curve else None,
        last_loss=state.curve[-1]["loss"] if state.curve else None,
        eval_before={k: v for k, v in evals[0].items() if k not in ("step", "stage")} if evals else {},
        eval_after={k: v for k, v in evals[-1].items() if k not in ("step", "stage")} if len(evals) > 1 else {},
        data_sha256=data_hash(tokens), seconds=round(state.seconds, 3), num_processes=accelerator.num_processes,
        stopped=stopped, stages=state.stages, teacher_cache=cache)


def _progress(enabled: bool):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled, transient=True)
