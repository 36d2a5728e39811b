"""The distillation loop, on accelerate: one code path for the CPU, one GPU and several (DDP
through ``accelerate launch``; FSDP is refused until the student is saved from a gathered state
dict and that is measured on GPUs), with mixed precision, gradient accumulation, gradient
checkpointing and exact save/resume (``Accelerator.save_state`` keeps the model, optimizer,
scheduler and every RNG; :class:`TrainState` keeps the step and the data position).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import MoECompressError
from .data import BatchOrder, shard
from .losses import ce_loss, hidden_loss
from .teacher import kl_to_teacher, teacher_hidden
from ..options import DistillOptions

STATE_FILE = "trainer.json"
CONFIG_DIR = "student-config"


@dataclass
class TrainState:
    stage: int = 0  # index of the stage being trained
    step: int = 0  # optimizer steps done in that stage
    global_step: int = 0
    micro: int = 0  # global micro-batches consumed: the data position
    tokens: int = 0
    seconds: float = 0.0  # training wall time so far (over resumes)
    curve: list = field(default_factory=list)  # {step, stage, loss, kl, hidden, ce, lr, tokens, tokens_per_s}
    evals: list = field(default_factory=list)  # {step, stage, file: ppl}
    stages: list = field(default_factory=list)  # what each stage's cut did
    stage_done_cut: bool = False  # the current stage's cut (and expert-wise step) is applied

    def save(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "TrainState":
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def make_accelerator(opts: DistillOptions):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    cpu = opts.cpu or not torch.cuda.is_available()
    mp = opts.mixed_precision
    if mp == "auto":
        mp = "bf16" if not cpu and torch.cuda.is_bf16_supported() else "no"
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state()  # a second call in one process may change precision
    # split_batches: --batch-size is the global batch, whatever the number of processes.
    acc = Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=opts.grad_accum,
                      dataloader_config=DataLoaderConfiguration(split_batches=True))
    if acc.distributed_type.name == "FSDP":  # unwrap_model would save this process's shard only
        raise MoECompressError("distill does not support FSDP yet: launch with DDP (accelerate launch --multi_gpu) "
                               "on GPUs that each hold the student and the teacher")
    return acc


def set_trainable(model, train: str) -> None:
    from ..arch import moe_view

    model.requires_grad_(train == "all")
    if train != "all":
        for layer in moe_view(model):
            for p in layer.expert_parameters().values():
                p.requires_grad_(True)
            if train == "experts+router":
                layer.router.requires_grad_(True)


def make_optimizer(model, opts: DistillOptions, steps: int, on_cpu: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.optim == "adamw8bit":
        if on_cpu:
            raise MoECompressError("--optim adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit AdamW); use --optim adamw "
                                   "on the CPU")
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=opts.lr, weight_decay=opts.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    warm = int(opts.warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if opts.lr_schedule == "constant" or steps <= warm:
            return 1.0
        t = (step - warm) / max(1, steps - warm)
        return 1.0 - t if opts.lr_schedule == "linear" else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []


def save_checkpoint(accelerator, root: Path, state: TrainState, student) -> Path:
    folder = root / f"step-{state.global_step:07d}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        accelerator.unwrap_model(student).config.save_pretrained(folder / CONFIG_DIR)
        state.save(folder)
        for old in checkpoints(root)[:-1]:  # keep the newest only
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


class Evaluator:
    """Validation perplexity of the student on the ``--eval`` files (first ``eval_tokens``)."""

    def __init__(self, tokenizer, files, opts: DistillOptions):
        from ..evaluate.perplexity import load_text_tokens

        self.files = {str(f): load_text_tokens(tokenizer, f, opts.eval_tokens) for f in files}
        self.seq_len = opts.eval_seq_len

    def __call__(self, model, accelerator) -> dict[str, float]:
        from ..evaluate.perplexity import perplexity

        was = model.training
        model.eval()
        with accelerator.autocast():
            out = {Path(f).stem: round(perplexity(model, ids, self.seq_len, batch_size=8)["ppl"], 4)
                   for f, ids in self.files.items()}
        model.train(was)
        return out


def train_stage(accelerator, student, teacher, tokens: torch.Tensor, order: BatchOrder, opts: DistillOptions, *,
                steps: int, state: TrainState, ckpt_root: Path, resume_from: Path | None, evaluator: Evaluator | None,
                bar=None, run_budget: list[int] | None = None) -> bool:
    """Distil ``student`` for ``steps`` optimizer steps of the current stage (from ``state.step``);
    ``teacher(micro, ids)`` gives the teacher's record of global micro-batch ``micro``
    (:class:`.teacher.LiveTeacher` or :class:`.teacher.TeacherCache`). Returns False if ``run_budget`` (``--stop-after``) ran out first, after saving a checkpoint."""
    on_cpu = accelerator.device.type == "cpu"
    set_trainable(student, opts.train)
    if opts.gradient_checkpointing:
        # transformers >= 5.2x renamed it activation_checkpointing_enable; older ones lack that
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    optimizer, scheduler = make_optimizer(student, opts, steps, on_cpu)
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
    world, rank = accelerator.num_processes, accelerator.process_index
    if opts.batch_size % world:
        raise MoECompressError(f"--batch-size {opts.batch_size} does not split over {world} processes; use a multiple "
                               f"of {world}")
    want_hidden = opts.loss == "kl+hidden"
    device = accelerator.device
    task = bar.add_task(f"stage {state.stage + 1}", total=steps, completed=state.step, loss="", speed="") \
        if bar is not None else None
    started = t0 = time.perf_counter()
    tokens_at_start = state.tokens
    try:
        while state.step < steps:
            if run_budget is not None and run_budget[0] <= 0:
                state.seconds += time.perf_counter() - started
                save_checkpoint(accelerator, ckpt_root, state, model)
                return False
            sums = torch.zeros(4, device=device)  # loss, kl, hidden, ce over this step's micro-batches
            for _ in range(opts.grad_accum):
                ids = shard(tokens[order[state.micro]], rank, world).to(device)
                with accelerator.accumulate(model):
                    rec = teacher(state.micro, ids)
                    s_out = model(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
                    kl = kl_to_teacher(s_out.logits, rec, opts.temperature)
                    hid = hidden_loss(s_out.hidden_states, teacher_hidden(rec, device)) \
                        if want_hidden else torch.zeros((), device=device)
                    ce = ce_loss(s_out.logits, ids) if opts.ce_weight else torch.zeros((), device=device)
                    loss = kl + opts.hidden_weight * hid + opts.ce_weight * ce
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and opts.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += torch.stack([loss.detach(), kl.detach(), hid.detach(), ce.detach()]).float() / opts.grad_accum
                state.micro += 1
            sums = accelerator.reduce(sums, reduction="mean")
            state.step += 1
            state.global_step += 1
            state.tokens += opts.batch_size * opts.grad_accum * tokens.shape[1]
            elapsed = state.seconds + time.perf_counter() - started
            speed = (state.tokens - tokens_at_start) / max(1e-9, time.perf_counter() - t0)
            if state.step % opts.log_every == 0 or state.step == steps:
                state.curve.append({"step": state.global_step, "stage": state.stage, "loss": float(sums[0]),
                                    "kl": float(sums[1]), "hidden": float(sums[2]), "ce": float(sums[3]),
                                    "lr": scheduler.get_last_lr()[0], "tokens": state.tokens,
                                    "tokens_per_s": round(speed, 1)})
            if bar is not None:
                bar.update(task, completed=state.step, loss=f"loss {float(sums[0]):.4f}", speed=f"{speed:,.0f} tok/s")
            if evaluator is not None and opts.eval_every and state.step % opts.eval_every == 0 and state.step < steps:
                record_eval(accelerator, model, evaluator, state)
            if run_budget is not None:
                run_budget[0] -= 1
            if opts.checkpoint_every and state.global_step % opts.checkpoint_every == 0:
                state.seconds, started = elapsed, time.perf_counter()
                save_checkpoint(accelerator, ckpt_root, state, model)
    finally:
        if bar is not None and task is not None:
            bar.update(task, visible=False)
    state.seconds += time.perf_counter() - started
    accelerator.wait_for_everyone()
    student = accelerator.unwrap_model(model)
    if opts.gradient_checkpointing:
        (getattr(student, "activation_checkpointing_disable", None) or student.gradient_checkpointing_disable)()
    accelerator.free_memory()  # drop the optimizer and wrappers: the next stage changes shapes
    student.requires_grad_(False)
    return True


def record_eval(accelerator, model, evaluator: Evaluator, state: TrainState) -> None:
    if accelerator.is_main_process:
        ppl = evaluator(accelerator.unwrap_model(model), accelerator)
        state.evals.append({"step": state.global_step, "stage": state.stage, **ppl})
    accelerator.wait_for_everyone()
