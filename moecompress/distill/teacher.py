"""The teacher's side of the distillation losses, computed live or read from a disk cache
(``--cache-teacher``).

A *record* is what the losses need of the teacher for one micro-batch: the full logits (in
the dtype the teacher computes them in: bf16 under bf16 mixed precision on a GPU, fp32 on the
CPU, so the cache is lossless), or with ``--top-k-logits K`` the log-probs and ids of its K
most likely tokens and the log-mass of "any other token" (``losses.top_k_targets``); with
``--loss kl+hidden`` also the hidden states of every decoder layer. :class:`LiveTeacher` makes
records with the teacher model in memory; :class:`TeacherCache` reads the ones
:func:`build_cache` wrote, and the training loop cannot tell them apart.

The cache is kept per *global micro-batch* in the trainer's order (``BatchOrder``) and per
process (each rank's slice, ``shard``), not per sequence: a teacher's output for a sequence
depends on the other sequences of its batch in the last bits (MoE experts see different row
counts), so only the very batches training sees give the bytes of a run without the cache.
The micro-batch index is the resume position, and stages continue it, so resumed and staged
runs read what they would have computed. A manifest holds the key (teacher fingerprint, data
hash, seq_len, K, temperature, hidden, seed, batch size, processes, precision): a different
key wipes the cache's files and rebuilds; a longer run adds the missing micro-batches. Each
file is written to a temporary name and renamed, so a killed build leaves only whole files.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import MoECompressError
from .data import BatchOrder, shard
from .losses import kl_loss, kl_top_k, top_k_targets

FORMAT = 1
MANIFEST = "manifest.json"
_GIB = 2**30


def teacher_record(model, ids: torch.Tensor, opts, accelerator) -> dict:
    """The teacher's record of one micro-batch ``ids`` (tensors on the teacher's device)."""
    want_hidden = opts.loss == "kl+hidden"
    with torch.no_grad():
        with accelerator.autocast():
            out = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False,
                        output_hidden_states=want_hidden)
        rec = {}
        if opts.top_k_logits is not None and opts.top_k_logits < out.logits.shape[-1]:
            rec["logp"], rec["idx"], rec["rest"] = top_k_targets(out.logits, temperature=opts.temperature,
                                                                 top_k=opts.top_k_logits)
        else:
            rec["logits"] = out.logits
        if want_hidden:  # index 0 (the embeddings) is not distilled
            rec["hidden"] = list(out.hidden_states[1:])
    return rec


def kl_to_teacher(student_logits: torch.Tensor, rec: dict, temperature: float) -> torch.Tensor:
    dev = student_logits.device
    if "logits" in rec:
        return kl_loss(student_logits, rec["logits"].to(dev), temperature=temperature)
    return kl_top_k(student_logits, *(rec[k].to(dev) for k in ("logp", "idx", "rest")), temperature=temperature)


def teacher_hidden(rec: dict, device) -> list:
    """The teacher's hidden states as ``output_hidden_states`` lists them (no embeddings: None)."""
    return [None, *(h.to(device) for h in rec["hidden"])]


class TeacherModel:
    """The teacher checkpoint, loaded on first use and freed on demand (``--cache-teacher``
    loads it only to fill the cache and for expert-wise distillation)."""

    def __init__(self, path: str, dtype: torch.dtype, device: str):
        self.path, self.dtype, self.device, self.model = path, dtype, device, None

    def get(self):
        if self.model is None:
            from ..checkpoint import load_model

            self.model = load_model(self.path, dtype=self.dtype, device=self.device)
        return self.model

    def free(self) -> None:
        if self.model is not None:
            self.model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


class LiveTeacher:
    def __init__(self, model, opts, accelerator):
        self.model, self.opts, self.accelerator = model, opts, accelerator

    def __call__(self, micro: int, ids: torch.Tensor) -> dict:
        return teacher_record(self.model, ids, self.opts, self.accelerator)


class TeacherCache:
    def __init__(self, folder: Path, rank: int):
        self.folder, self.rank = Path(folder), rank

    def path(self, micro: int, rank: int | None = None) -> Path:
        return self.folder / f"r{self.rank if rank is None else rank:03d}-m{micro:08d}.safetensors"

    def __call__(self, micro: int, ids: torch.Tensor) -> dict:
        from safetensors.torch import load_file

        try:
            t = load_file(self.path(micro))
        except FileNotFoundError:
            raise MoECompressError(f"teacher cache '{self.folder}' lost micro-batch {micro} during training; "
                                   "run again (the cache is rebuilt where it is missing)") from None
        rec = {k: v for k, v in t.items() if k != "hidden"}
        if "idx" in rec:
            rec["idx"] = rec["idx"].long()
        if "hidden" in t:
            rec["hidden"] = list(t["hidden"].unbind(0))
        return rec

    def write(self, micro: int, rec: dict) -> int:
        from safetensors.torch import save_file

        t = {k: v for k, v in rec.items() if k != "hidden"}
        if "idx" in t:
            t["idx"] = t["idx"].to(torch.int32)  # vocabularies are < 2^31: half the bytes of int64
        if "hidden" in rec:
            t["hidden"] = torch.stack(rec["hidden"])
        t = {k: v.detach().to("cpu").contiguous() for k, v in t.items()}
        final = self.path(micro)
        tmp = final.with_name(final.name + ".tmp")
        save_file(t, str(tmp))
        os.replace(tmp, final)
        return final.stat().st_size

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("r*-m*.safetensors"))


def cache_key(teacher: str, data_sha256: str, opts, *, vocab_size: int, processes: int, mixed_precision: str,
              teacher_dtype: torch.dtype, device_type: str) -> dict:
    """What the cached records depend on; a cache whose manifest holds another key is rebuilt."""
    from ..recipe.runner import fingerprint

    k = opts.top_k_logits if opts.top_k_logits is not None and opts.top_k_logits < vocab_size else None
    return {"format": FORMAT, "teacher": fingerprint(teacher) if Path(teacher).exists() else str(teacher),
            "data_sha256": data_sha256, "seq_len": opts.seq_len, "top_k_logits": k,
            "temperature": opts.temperature if k is not None else None, "hidden": opts.loss == "kl+hidden",
            "seed": opts.seed, "batch_size": opts.batch_size, "processes": processes,
            "mixed_precision": mixed_precision, "teacher_dtype": str(teacher_dtype), "device": device_type}


def estimate_bytes(config, opts, micro_batches: int, *, mixed_precision: str, teacher_dtype: torch.dtype) -> int:
    """Disk the records of ``micro_batches`` global micro-batches take (all processes)."""
    elt = 2 if mixed_precision in ("bf16", "fp16") else teacher_dtype.itemsize
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab, k = text.vocab_size, opts.top_k_logits
    per_token = k * (4 + 4) + 4 if k is not None and k < vocab else vocab * elt
    if opts.loss == "kl+hidden":
        per_token += text.num_hidden_layers * text.hidden_size * elt
    return micro_batches * opts.batch_size * opts.seq_len * per_token


def check_size(folder: Path, need: int, opts, vocab_size: int) -> None:
    """Refuse, in one line, a cache larger than ``--cache-max-gib`` or the free disk."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free, cap = shutil.disk_usage(existing).free, opts.teacher_cache_max_gib * _GIB
    limit = min(cap, free)
    if need <= limit:
        return
    what = "the free disk" if free < cap else f"--teacher-cache-max-gib {opts.teacher_cache_max_gib:g}"
    hint = (f"pass --top-k-logits 8 (SlimMoE's K; ~68 bytes a token instead of {vocab_size:,} logits)"
            if opts.top_k_logits is None else "train fewer steps")
    raise MoECompressError(f"--cache-teacher: the cache would take {need / _GIB:.3g} GiB, more than {what} "
                           f"({limit / _GIB:.3g} GiB); {hint}, raise --teacher-cache-max-gib, or drop --cache-teacher")


def build_cache(folder: Path, key: dict, micro: range, tokens: torch.Tensor, order: BatchOrder, opts, accelerator,
                teacher: TeacherModel, bar=None) -> tuple[TeacherCache, dict]:
    """Make sure ``folder`` holds this process's records of the global micro-batches ``micro``
    under ``key``: a stale cache is wiped, missing records are computed with ``teacher``."""
    world, rank = accelerator.num_processes, accelerator.process_index
    cache = TeacherCache(folder, rank)
    manifest = folder / MANIFEST
    stale = False
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        old = json.loads(manifest.read_text()) if manifest.is_file() else None
        if old is None or old.get("key") != key:
            stale = old is not None
            for f in [*cache.files(), *folder.glob("r*-m*.safetensors.tmp")]:  # only our files: it may be a user's folder
                f.unlink()
            manifest.write_text(json.dumps({"key": key}, indent=1, sort_keys=True) + "\n")
    accelerator.wait_for_everyone()
    missing = [m for m in micro if not cache.path(m).is_file()]
    task = bar.add_task("teacher cache", total=len(missing), loss="", speed="") if bar is not None and missing \
        else None
    written = 0
    for i, m in enumerate(missing):
        ids = shard(tokens[order[m]], rank, world)
        written += cache.write(m, teacher_record(teacher.get(), ids, opts, accelerator))
        if task is not None:
            bar.update(task, completed=i + 1)
    if task is not None:
        bar.update(task, visible=False)
    accelerator.wait_for_everyone()
    info = {"dir": str(folder), "micro_batches": len(micro), "built": len(missing), "reused": len(micro) - len(missing),
            "stale_rebuilt": stale, "bytes": sum(cache.path(m, r).stat().st_size for m in micro for r in range(world))
            if accelerator.is_main_process else written}
    return cache, info
