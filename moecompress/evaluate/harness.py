"""Downstream tasks through EleutherAI's lm-evaluation-harness, on an already-loaded model.

The model is wrapped in lm-eval's ``HFLM`` (no second load from disk), and tasks are found by
lm-eval's ``TaskManager``: the example tasks shipped in ``moecompress/tasks`` (local data, no
network), any ``include_path`` folders of task YAMLs, and lm-eval's own task registry (whose
datasets usually come from the Hub).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import MoECompressError

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
# lm-eval reports "<metric>,<filter>" keys; these are the ones worth a table row.
_SKIP_SUFFIX = "_stderr"
_BOOKKEEPING = {"alias", "sample_len", "samples", "sample_count"}


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MoECompressError("lm-eval is not installed; run: pip install 'moecompress[eval]' "
                               "(or drop --tasks to compute only perplexity)") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], include_path: list[str | os.PathLike] | None = None):
    """A TaskManager that knows every task in ``tasks``; a clear error naming the unknown ones.

    lm-eval's own registry (thousands of YAMLs, a few seconds to index) is read only when a task
    is not found in the shipped and ``include_path`` folders.
    """
    paths = [str(TASKS_DIR)]
    for p in include_path or []:
        if not Path(p).is_dir():
            raise MoECompressError(f"--include-path '{p}' is not a folder; pass a folder of lm-eval task YAMLs")
        paths.append(str(Path(p).resolve()))
    key = (tuple(tasks), tuple(paths))
    if _last_manager.get("key") == key:  # checked before loading the model, used after it (eval)
        return _last_manager["tm"]
    _, _, TaskManager = _lm_eval()
    tm = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(tm.all_tasks):
        tm = TaskManager(include_path=paths)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise MoECompressError(f"unknown lm-eval task(s): {', '.join(missing)}; check the names with "
                               "`lm-eval ls tasks`, or pass --include-path with a folder of task YAMLs")
    _last_manager.update(key=key, tm=tm)
    return tm


_last_manager: dict = {}  # the last TaskManager built, with its (tasks, paths)


def run_tasks(model, tokenizer, tasks: list[str], *, include_path: list[str | os.PathLike] | None = None,
              limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 1,
              seed: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model``; returns ``{task: {metric: value}}``.

    Metric names drop lm-eval's filter suffix (``"acc,none"`` -> ``"acc"``); standard errors are
    kept as ``"<metric>_stderr"``. ``limit`` caps the examples per task (a fraction if < 1).
    """
    if not tasks:
        return {}
    lm_eval, HFLM, _ = _lm_eval()
    tm = task_manager(tasks, include_path)
    if tokenizer is None:
        raise MoECompressError("lm-eval tasks need a tokenizer; pass --tokenizer with a folder or Hub id that has one")
    # lm-eval logs a warning per run about passing a model object; that is exactly what we want here.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit,
                                      num_fewshot=num_fewshot, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                      bootstrap_iters=1000)
    except (FileNotFoundError, ConnectionError) as e:
        raise MoECompressError(f"lm-eval could not load a task's data: {e}; for offline use pass --include-path "
                               "with task YAMLs that read local files") from None
    results = {}
    for task, metrics in (out or {}).get("results", {}).items():
        clean = {}
        for key, value in metrics.items():
            if key.split(",")[0] in _BOOKKEEPING or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = key.split(",")[0]
            clean[name] = float(value)
        results[task] = clean
    return results


def headline_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics worth a table row (drops standard errors)."""
    return {k: v for k, v in metrics.items() if not k.endswith(_SKIP_SUFFIX)}
