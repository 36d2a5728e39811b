"""Calibration data: text from files, shipped sets or Hub datasets, tokenised into [n, seq_len].

Sources (``source``):
* ``.txt``: the whole file is one text (``document`` mode: documents are separated by blank
  lines);
* ``.jsonl``: one JSON object per line, ``field`` names the text;
* ``.parquet``: the ``field`` column (needs ``pyarrow``);
* the name of a set shipped with the package (``python_docs``, ``python_code``,
  ``numpy_docs``; see ``calibration/README.md``), with or without its suffix;
* a Hub dataset ``org/name``, ``org/name:split`` or ``org/name:config:split`` (needs the
  ``datasets`` package and network; offline gives a clear error pointing to local files).

Two ways to make sequences (``mode``):
* ``chunk`` (default): concatenate all documents (separated by EOS) and cut the token stream
  into non-overlapping ``seq_len`` chunks; ``n`` of them are drawn with ``seed``.
* ``document``: one sequence per document, its first ``seq_len`` tokens; documents shorter
  than ``seq_len`` are skipped.
Same inputs and seed give the same tensor. Empty or too-short data raise
:class:`MoECompressError` saying what to change.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import torch

from .errors import MoECompressError
from .integrity import check_text
from .options.groups import DEFAULT_N, DEFAULT_SEQ_LEN

Mode = Literal["chunk", "document"]
MODES = ("chunk", "document")
_SUFFIXES = (".txt", ".jsonl", ".parquet")


def default_sets_dir() -> Path:
    """The calibration sets shipped with the package: ``moecompress/calibration_data`` (the
    real folder, installed as package data; ``calibration/`` at the project root links to it),
    else ``<repo>/calibration``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "calibration_data", here.parent / "calibration"):
        if cand.is_dir():
            return cand
    return here / "calibration_data"


def default_sets() -> dict[str, Path]:
    """Shipped set name (file stem) -> file."""
    d = default_sets_dir()
    return {p.stem: p for p in sorted(d.glob("*")) if p.suffix in _SUFFIXES} if d.is_dir() else {}


def _shipped(s: str) -> Path | None:
    sets = default_sets()
    return sets.get(s) or sets.get(Path(s).stem if Path(s).suffix in _SUFFIXES and "/" not in s else "")


def _looks_like_hub(s: str) -> bool:
    """``org/name[:config][:split]`` that is not a (missing) local file path."""
    if s.startswith((".", "/", "~")) or Path(s.split(":")[0]).suffix.lower() in (*_SUFFIXES, ".json", ".csv", ".gz"):
        return False
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+){0,2}", s))


def check_source(source: str | os.PathLike) -> None:
    """Cheap validation before loading a model: an existing file, a shipped set or a Hub name."""
    s = str(source)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_dir():
            raise MoECompressError(f"calibration source '{s}' is a folder; pass a .txt, .jsonl or .parquet file")
        if p.suffix.lower() != ".parquet":  # text: check its start now, before a model is loaded
            with open(p, "rb") as f:
                check_text(f.read(1 << 22), s, partial=True)
        return
    if _shipped(s) is not None or _looks_like_hub(s):
        return
    names = ", ".join(default_sets()) or "none"
    raise MoECompressError(f"calibration file '{s}' not found; pass a .txt/.jsonl/.parquet file, "
                           f"a shipped set ({names}) or a Hub dataset org/name[:split]")


def _read_jsonl(p: Path, field: str) -> list[str]:
    docs = []
    for i, line in enumerate(check_text(p.read_bytes(), str(p)).split("\n")):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise MoECompressError(f"{p}:{i + 1} is not valid JSON; a .jsonl file holds one JSON object per line") from None
        if not isinstance(row, dict):
            raise MoECompressError(f"{p}:{i + 1} is not a JSON object; each line must be like {{\"{field}\": \"...\"}}")
        if field not in row:
            raise MoECompressError(f"{p}:{i + 1} has no field '{field}' (fields: {', '.join(map(str, row))}); "
                                   "choose the text field with --field")
        docs.append(str(row[field]))
    return docs


def _read_parquet(p: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MoECompressError("reading .parquet needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # corrupt / not parquet
        raise MoECompressError(f"cannot read '{p}' as parquet ({type(e).__name__}); pass a valid .parquet file") from None
    if field not in table.column_names:
        raise MoECompressError(f"{p} has no column '{field}'; columns: {', '.join(table.column_names)}; use --field")
    return [str(t) for t in table.column(field).to_pylist() if t is not None]


def read_documents(source: str | os.PathLike, field: str = "text", mode: Mode = "chunk") -> list[str]:
    """Documents of a calibration source, in file order (empty documents dropped)."""
    s = str(source)
    p = Path(s).expanduser()
    if not p.exists():
        p = _shipped(s) or p
    if p.exists():
        if p.is_dir():
            raise MoECompressError(f"calibration source '{s}' is a folder; pass a .txt, .jsonl or .parquet file")
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            docs = _read_jsonl(p, field)
        elif suffix == ".parquet":
            docs = _read_parquet(p, field)
        else:
            text = check_text(p.read_bytes(), s)
            docs = re.split(r"\n[ \t]*\n", text) if mode == "document" else [text]
    elif _looks_like_hub(s):
        docs = _hub_documents(s, field)
    else:
        check_source(s)  # raises the not-found message
        docs = []
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MoECompressError(f"calibration source '{s}' holds no text; pass a file with text in it")
    return docs


def _hub_documents(name: str, field: str) -> list[str]:
    repo, *rest = name.split(":")
    config, split = (None, rest[0]) if len(rest) == 1 else (rest[0], rest[1]) if len(rest) == 2 else (None, "train")
    offline_hint = f"pass a local .txt/.jsonl/.parquet file or a shipped set ({', '.join(default_sets())})"
    try:
        import datasets
    except ImportError:
        raise MoECompressError(f"'{name}' looks like a Hub dataset; install `datasets` or {offline_hint}") from None
    from .source import _hub_reachable

    if not _hub_reachable():
        raise MoECompressError(f"'{name}' looks like a Hub dataset but the Hub is unreachable (offline); {offline_hint}")
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # missing, gated, bad split...
        raise MoECompressError(f"cannot load Hub dataset '{name}' ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                               f"{offline_hint}") from None
    if field not in ds.column_names:
        raise MoECompressError(f"dataset '{repo}' has no column '{field}'; columns: {', '.join(ds.column_names)}; use --field")
    return [str(t) for t in ds[field] if t is not None]


def load_calibration(
    tokenizer,
    source: str | os.PathLike,
    n: int = DEFAULT_N,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    mode: Mode = "chunk",
    field: str = "text",
    extend_to: int | None = None,
) -> torch.Tensor:
    """Token ids [n, seq_len] (int64) drawn from ``source``. With ``extend_to``, up to that many
    sequences (all the source has if fewer, never fewer than ``n``): the same seeded draw
    continued, so the result contains the ``n`` sequences drawn without it."""
    return load_calibration_draws(tokenizer, source, n, seq_len, seed, mode, field, extend_to)[-1]


def load_calibration_draws(
    tokenizer,
    source: str | os.PathLike,
    n: int = DEFAULT_N,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    mode: Mode = "chunk",
    field: str = "text",
    extend_to: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """``load_calibration``'s draw, then (with ``extend_to``) its continued draw too, from one
    reading and tokenisation of ``source`` (a stage that selects on ``n`` sequences and re-fits
    on more reads the text once)."""
    if n < 1 or seq_len < 2:
        raise MoECompressError("calibration needs -n >= 1 samples of --seq-len >= 2 tokens")
    seqs, have = _sequences(tokenizer, source, seq_len, mode, field)
    if seqs.shape[0] < n:
        raise MoECompressError(
            f"calibration source '{source}' gives only {seqs.shape[0]} sequences of {seq_len} tokens "
            f"({mode} mode, {have}), {n} asked; lower -n or --seq-len, or give more text"
        )
    order = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(seed))
    counts = [n] if extend_to is None else [n, max(n, min(extend_to, seqs.shape[0]))]
    return tuple(seqs[order[:k].sort().values].clone() for k in counts)


def load_sequences(tokenizer, source: str | os.PathLike, seq_len: int = 512, mode: Mode = "chunk",
                   field: str = "text") -> torch.Tensor:
    """Every sequence [N, seq_len] of ``source``, in file order (training data: ``distill --data``)."""
    if seq_len < 2:
        raise MoECompressError("--seq-len must be at least 2 tokens")
    seqs, have = _sequences(tokenizer, source, seq_len, mode, field)
    if seqs.shape[0] < 1:
        raise MoECompressError(f"'{source}' gives no sequence of {seq_len} tokens ({mode} mode, {have}); "
                               "lower --seq-len or give more text")
    return seqs


def _sequences(tokenizer, source, seq_len: int, mode: str, field: str) -> tuple[torch.Tensor, str]:
    if mode not in MODES:
        raise MoECompressError(f"unknown calibration mode '{mode}'; use chunk or document")
    docs = read_documents(source, field, mode)
    eos = tokenizer.eos_token_id
    if mode == "chunk":
        ids: list[int] = []
        for d in docs:
            ids.extend(tokenizer(d, add_special_tokens=False).input_ids)
            if eos is not None and len(docs) > 1:
                ids.append(eos)
        n_seqs = len(ids) // seq_len
        seqs = torch.tensor(ids[: n_seqs * seq_len], dtype=torch.long).reshape(n_seqs, seq_len)
        have = f"{len(ids)} tokens"
    else:
        rows = [tokenizer(d, add_special_tokens=False).input_ids[:seq_len] for d in docs]
        rows = [r for r in rows if len(r) == seq_len]
        seqs = torch.tensor(rows, dtype=torch.long).reshape(len(rows), seq_len)
        have = f"{len(docs)} documents, {len(rows)} of them with >= {seq_len} tokens"
    return seqs, have
