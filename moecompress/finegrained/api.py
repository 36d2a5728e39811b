"""One entry point for the fine-grained methods, used by ``moecompress prune``.

``finegrained_prune`` edits a loaded model; ``prune_checkpoint`` loads a checkpoint, draws the
calibration tokens, prunes and writes the result (nothing is written on failure).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MoECompressError
from .heapr import heapr_prune
from .stun import stun_prune
from .unstructured import METHODS as UNSTRUCTURED_METHODS
from .unstructured import parse_nm, unstructured_prune

METHODS = ("heapr", *UNSTRUCTURED_METHODS, "stun-unstructured")


def finegrained_prune(model, tokens: torch.Tensor | None, method: str, *, ratio: float | None = None,
                      sparsity: float | None = None, nm: str | tuple[int, int] | None = None,
                      heapr_global: bool = False, stun_expert_ratio: float | None = None,
                      stun_expert_method: str = "stun", stun_unstructured: str = "wanda",
                      batch_size: int = 8, progress: bool = True) -> dict:
    """Prune ``model`` in place with one of :data:`METHODS`; returns the JSON-able report."""
    nm = parse_nm(nm) if isinstance(nm, str) else nm
    if method == "heapr":
        if ratio is None:
            raise MoECompressError("heapr needs --ratio R (the fraction of each expert's neurons to remove)")
        if sparsity is not None or nm is not None:
            raise MoECompressError("heapr removes whole neurons: use --ratio, not --sparsity/--nm")
        return heapr_prune(model, tokens, ratio, global_ranking=heapr_global, batch_size=batch_size, progress=progress)
    if method in UNSTRUCTURED_METHODS:
        return unstructured_prune(model, tokens, sparsity, method, nm, batch_size=batch_size, progress=progress)
    if method == "stun-unstructured":
        if stun_expert_ratio is None:
            raise MoECompressError("stun-unstructured needs --stun-expert-ratio R (fraction of experts removed first)")
        return stun_prune(model, tokens, sparsity, stun_expert_ratio, expert_method=stun_expert_method,
                          unstructured=stun_unstructured, nm=nm, batch_size=batch_size, progress=progress)
    raise MoECompressError(f"unknown fine-grained method '{method}'; use one of: {', '.join(METHODS)}")


def prune_checkpoint(model_path: str | os.PathLike, out: str | os.PathLike, method: str, *,
                     calib: str | os.PathLike | None, n: int = 64, seq_len: int = 512, seed: int = 0,
                     overwrite: bool = False, dtype: str = "auto", device: str | None = None, field: str = "text",
                     **options) -> dict:
    """Load ``model_path``, prune with ``method`` (options as :func:`finegrained_prune`), save to ``out``."""
    from transformers import AutoTokenizer

    from ..calibration import load_calibration
    from ..checkpoint import load_config, load_model, output_folder, resolve_source, save_model, stored_dtype

    if method not in METHODS:
        raise MoECompressError(f"unknown fine-grained method '{method}'; use one of: {', '.join(METHODS)}")
    with output_folder(out, overwrite=overwrite, source=model_path, check=True) as folder:
        tokens = None
        if method != "magnitude":
            if calib is None:
                raise MoECompressError(f"{method} needs calibration text: pass --calib FILE")
            tokenizer = AutoTokenizer.from_pretrained(resolve_source(model_path))
            tokens = load_calibration(tokenizer, calib, n=n, seq_len=seq_len, seed=seed, field=field)
        stored = stored_dtype(load_config(model_path))  # read before loading: loading rewrites config.dtype
        model = load_model(model_path, dtype=dtype, device=device)
        torch.manual_seed(seed)
        report = finegrained_prune(model, tokens, method, **options)
        if stored is not None and model.dtype != stored:  # compute in --dtype, store as the input was
            model.to(stored)
        record = {"stage": "prune", "method": method, "options": {k: v for k, v in options.items() if k != "progress"},
                  "calibration": None if tokens is None else {"source": str(calib), "n": n, "seq_len": seq_len, "seed": seed,
                                                             "field": field},
                  "seed": seed, "report": report}
        save_model(model, Path(folder), source=model_path, record=record)
    return report

