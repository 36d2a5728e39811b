"""Evaluation of (compressed) checkpoints: perplexity, KL to the base, lm-eval tasks, reports.

Library entry points (other stages call these):

* :func:`load_text_tokens` / :func:`perplexity` — perplexity on a text file, in windows;
* :func:`compare_to_base` — KL(base || model), top-1 agreement and both perplexities;
* :func:`run_tasks` — lm-eval tasks on a loaded model;
* :func:`evaluate_models` / :func:`evaluate_checkpoint` — all of the above into one result dict
  (see :mod:`moecompress.evaluate.report` for its layout and the tables).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import MoECompressError
from ..options.groups import DEFAULT_SEQ_LEN
from ..options import EvalOptions, library_function
from .harness import run_tasks
from .kl import compare_to_base, kl_divergence
from .perplexity import load_text_tokens, perplexity, windows
from .report import markdown_table, rich_table, rows, settings_line

__all__ = ["load_text_tokens", "perplexity", "windows", "compare_to_base", "kl_divergence", "run_tasks",
           "evaluate_models", "evaluate_checkpoint", "load_tokenizer", "markdown_table", "rich_table", "rows",
           "settings_line"]


def load_tokenizer(*sources: str | os.PathLike | None):
    """The tokenizer of the first source that has a usable one (None if none has)."""
    from ..checkpoint import resolve_source
    from ..source import load_tokenizer as checkpoint_tokenizer

    for src in sources:
        if src is None:
            continue
        try:
            return checkpoint_tokenizer(resolve_source(src), str(src))
        except (TypeError, MoECompressError):
            continue
    return None


def _names(files: Sequence[str | os.PathLike]) -> list[str]:
    """Result keys for text files: the file stem, or the path where two stems clash."""
    stems = [Path(f).stem for f in files]
    return [s if stems.count(s) == 1 else str(f) for s, f in zip(stems, files)]


def evaluate_models(model, tokenizer, *, base=None, ppl_files: Sequence[str | os.PathLike] = (),
                    tasks: Sequence[str] = (), include_path: Sequence[str | os.PathLike] = (),
                    limit: int | float | None = None, num_fewshot: int | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                    stride: int | None = None, max_tokens: int | None = 20_000, batch_size: int = 1,
                    progress=None) -> dict:
    """Evaluate a loaded ``model`` (and optionally its loaded ``base``) into one result dict.

    Perplexity uses non-overlapping ``seq_len`` windows (or ``stride``) over the first
    ``max_tokens`` predicted tokens of each file (None = whole file). With ``base``: KL(base ||
    model) and top-1 agreement on the same tokens, and the base's perplexity and tasks for a
    side-by-side table.
    """
    say = progress or (lambda msg: None)
    if (ppl_files or tasks) and tokenizer is None:
        raise MoECompressError("no tokenizer found next to the model; pass --tokenizer (a folder or Hub id)")
    result: dict = {"settings": {"seq_len": seq_len, "stride": stride or seq_len, "max_tokens": max_tokens,
                                 "limit": limit, "num_fewshot": num_fewshot},
                    "ppl": {}, "tokens": {}, "tasks": {}}
    if base is not None:
        result["base"] = {"ppl": {}, "tasks": {}}
        result["kl"], result["top1_agreement"] = {}, {}
    for name, path in zip(_names(ppl_files), ppl_files):
        ids = load_text_tokens(tokenizer, path, max_tokens)
        say(f"perplexity on {path} ({ids.numel() - 1} tokens)")
        if base is None:
            r = perplexity(model, ids, seq_len, stride=stride, batch_size=batch_size)
        else:
            r = compare_to_base(model, base, ids, seq_len, stride=stride, batch_size=batch_size)
            result["base"]["ppl"][name] = r["base_ppl"]
            result["kl"][name] = r["kl"]
            result["top1_agreement"][name] = r["top1_agreement"]
        result["ppl"][name] = r["ppl"]
        result["tokens"][name] = r["tokens"]
    if tasks:
        kw = dict(include_path=list(include_path), limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
        say(f"lm-eval tasks {', '.join(tasks)}")
        result["tasks"] = run_tasks(model, tokenizer, list(tasks), **kw)
        if base is not None:
            say(f"lm-eval tasks {', '.join(tasks)} (base)")
            result["base"]["tasks"] = run_tasks(base, tokenizer, list(tasks), **kw)
    return result


def _check_before_loading(*, ppl_files=(), seq_len: int = 512, stride: int | None = None,
                          max_tokens: int | None = 20_000) -> None:
    """What needs no model is checked before a model is loaded: the window settings, and that
    every --ppl file exists and is UTF-8 text."""
    from ..integrity import check_text
    from .perplexity import windows

    windows(max(seq_len, 1) * 2, seq_len, stride)  # raises the --seq-len / --stride message
    if max_tokens is not None and max_tokens < 1:
        raise MoECompressError(f"--max-tokens must be at least 1 (got {max_tokens})")
    for path in ppl_files:
        p = Path(path).expanduser()
        if not p.is_file():
            raise MoECompressError(f"text file '{path}' not found; pass a UTF-8 text file to --ppl")
        with open(p, "rb") as f:
            check_text(f.read(1 << 22), str(path), partial=True)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@library_function(EvalOptions)
def evaluate_checkpoint(model: str | os.PathLike, *, opts: EvalOptions, progress=None) -> dict:
    """Load ``model`` (and ``base``) and run :func:`evaluate_models` with the options of
    :class:`~moecompress.options.EvalOptions`.

    ``dtype="auto"`` computes in float32 on the CPU (how the testbed reference figures were
    computed) and in the checkpoint's own dtype on a GPU (``checkpoint.compute_dtype``).
    """
    from ..checkpoint import compute_dtype, load_model

    _check_before_loading(ppl_files=opts.ppl, seq_len=opts.seq_len, stride=opts.stride,
                          max_tokens=opts.max_tokens or None)
    if opts.tasks:  # the task names before a model loads (minutes for a large one)
        from .harness import task_manager

        task_manager(list(opts.tasks), list(opts.include_path))
    device = opts.device or default_device()
    dtype = compute_dtype(opts.dtype, device)
    device_map = None if device == "cpu" else device
    base = opts.base
    if opts.tokenizer is not None:
        tok = load_tokenizer(opts.tokenizer)
        if tok is None:
            raise MoECompressError(f"cannot load a tokenizer from '{opts.tokenizer}'; pass a folder with tokenizer files")
    else:
        tok = load_tokenizer(model, base)
    m = load_model(model, dtype=dtype, device=device_map)
    b = load_model(base, dtype=dtype, device=device_map) if base is not None else None
    limit = int(opts.limit) if opts.limit is not None and opts.limit >= 1 else opts.limit
    result = evaluate_models(m, tok, base=b, ppl_files=list(opts.ppl), tasks=list(opts.tasks),
                             include_path=list(opts.include_path), limit=limit, num_fewshot=opts.num_fewshot,
                             seq_len=opts.seq_len, stride=opts.stride, max_tokens=opts.max_tokens or None,
                             batch_size=opts.batch_size, progress=progress)
    result["model"] = str(model)
    if b is not None:
        result["base"]["model"] = str(base)
    result["settings"].update(dtype=str(dtype), device=device)
    return result
