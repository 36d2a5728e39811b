"""Calibration data: text from files or Hub datasets, tokenised into [n, seq_len] chunks.

Sources: ``.txt`` (whole file), ``.jsonl`` (one document per line, ``field`` names the text),
``.parquet`` (``field`` column), a name of a default set shipped in ``calibration/``, or a Hub
dataset name (``org/name`` or ``org/name:split``; needs the ``datasets`` package and network).

Two ways to make sequences:
* ``chunk`` (default): concatenate all documents (separated by EOS) and cut the token stream
  into non-overlapping ``seq_len`` chunks; ``n`` of them are drawn with ``seed``.
* ``document``: one sequence per document, its first ``seq_len`` tokens; documents shorter
  than ``seq_len`` are skipped.
Same inputs and seed give the same tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch

from .errors import MoECompressError

Mode = Literal["chunk", "document"]


def default_sets_dir() -> Path:
    """The calibration sets shipped with the package (``calibration/`` at the project root,
    installed as ``moecompress/calibration_data``)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "calibration_data", here.parent / "calibration"):
        if cand.is_dir():
            return cand
    return here / "calibration_data"


def default_sets() -> dict[str, Path]:
    d = default_sets_dir()
    return {p.stem: p for p in sorted(d.glob("*")) if p.suffix in (".txt", ".jsonl")} if d.is_dir() else {}


def read_documents(source: str | os.PathLike, field: str = "text") -> list[str]:
    """Documents of a calibration source, in file order."""
    s = str(source)
    p = Path(s).expanduser()
    if not p.exists() and s in default_sets():
        p = default_sets()[s]
    if p.exists():
        if p.is_dir():
            raise MoECompressError(f"calibration source '{s}' is a folder; pass a .txt, .jsonl or .parquet file")
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            docs = []
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise MoECompressError(f"{p}:{i + 1} is not valid JSON; a .jsonl file holds one JSON object per line") from None
                if field not in row:
                    raise MoECompressError(f"{p}:{i + 1} has no field '{field}'; choose the text field with --field")
                docs.append(str(row[field]))
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise MoECompressError("reading .parquet needs pyarrow: pip install pyarrow") from None
            table = pq.read_table(p)
            if field not in table.column_names:
                raise MoECompressError(f"{p} has no column '{field}'; columns: {', '.join(table.column_names)}; use --field")
            docs = [str(t) for t in table.column(field).to_pylist()]
        else:
            docs = [p.read_text(encoding="utf-8", errors="replace")]
    elif s.startswith((".", "/", "~")) or "/" not in s:
        names = ", ".join(default_sets()) or "none"
        raise MoECompressError(f"calibration file '{s}' not found; pass a .txt/.jsonl/.parquet file or a shipped set ({names})")
    else:
        docs = _hub_documents(s, field)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MoECompressError(f"calibration source '{s}' holds no text; pass a file with text in it")
    return docs


def _hub_documents(name: str, field: str) -> list[str]:
    repo, _, split = name.partition(":")
    try:
        import datasets
    except ImportError:
        raise MoECompressError(f"'{name}' looks like a Hub dataset; install `datasets` or pass a local .txt/.jsonl file") from None
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as e:  # offline, missing, gated...
        raise MoECompressError(f"cannot load Hub dataset '{repo}' ({type(e).__name__}); offline? pass a local .txt/.jsonl file") from None
    if field not in ds.column_names:
        raise MoECompressError(f"dataset '{repo}' has no column '{field}'; columns: {', '.join(ds.column_names)}; use --field")
    return [str(t) for t in ds[field]]


def load_calibration(
    tokenizer,
    source: str | os.PathLike,
    n: int = 64,
    seq_len: int = 512,
    seed: int = 0,
    mode: Mode = "chunk",
    field: str = "text",
) -> torch.Tensor:
    """Token ids [n, seq_len] (int64) drawn from ``source``."""
    if n < 1 or seq_len < 2:
        raise MoECompressError("calibration needs -n >= 1 samples of --seq-len >= 2 tokens")
    docs = read_documents(source, field)
    eos = tokenizer.eos_token_id
    if mode == "chunk":
        ids: list[int] = []
        for d in docs:
            ids.extend(tokenizer(d, add_special_tokens=False).input_ids)
            if eos is not None and len(docs) > 1:
                ids.append(eos)
        n_chunks = len(ids) // seq_len
        seqs = torch.tensor(ids[: n_chunks * seq_len], dtype=torch.long).reshape(n_chunks, seq_len)
    elif mode == "document":
        rows = [tokenizer(d, add_special_tokens=False).input_ids[:seq_len] for d in docs]
        rows = [r for r in rows if len(r) == seq_len]
        seqs = torch.tensor(rows, dtype=torch.long).reshape(len(rows), seq_len)
    else:
        raise MoECompressError(f"unknown calibration mode '{mode}'; use chunk or document")
    if seqs.shape[0] < n:
        raise MoECompressError(
            f"calibration source '{source}' gives only {seqs.shape[0]} sequences of {seq_len} tokens "
            f"({mode} mode), {n} asked; lower -n or --seq-len, or give more text"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(seqs.shape[0], generator=g)[:n].sort().values
    return seqs[pick].clone()
