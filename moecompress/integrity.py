"""Is an INPUT sound before any work is done on it?

* :func:`check_shards`: every weight file the checkpoint names exists, and every safetensors
  file's header parses and its size is exactly what the header describes (a truncated
  download or a half-copied shard fails here, naming the file, instead of deep inside
  transformers with ``SafetensorError: incomplete metadata``);
* :func:`first_nonfinite`: the first tensor holding NaN or Inf (read in slices, so memory
  stays bounded); ``moecompress check`` (output side, ``check.py``) uses the same scan;
* :func:`require_sound_input`: both, once per checkpoint and process, raising one
  ``MoECompressError`` line (``allow_nonfinite`` skips the value scan);
* :func:`check_text`: calibration text must be UTF-8 and mostly printable.

The header format is the safetensors spec: 8 bytes little-endian header length N, N bytes
of JSON (``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``), then
the data buffer, whose length must equal the largest ``end`` (the safetensors library refuses
anything else, with a message that names neither the file nor what to do).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from pathlib import Path

import torch

from .background import Background
from .errors import MoECompressError
from .shardwriter import ITEMSIZE

SHARD_INDEX = "model.safetensors.index.json"
_FLOAT = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_ITEMSIZE = {**ITEMSIZE, "F4": 1}  # F4 packs two values in a byte: its sizes are not checked
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)
_CHUNK_BYTES = 1 << 28  # values are scanned in slices of at most this many bytes
_MAX_HEADER = 100_000_000  # the safetensors library's own limit
_checked: set[tuple] = set()


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) of a safetensors file; ``MoECompressError`` naming the file if the
    header is unreadable or the file is not exactly as long as its header says."""
    return {k: (dt, shape) for k, (dt, shape, _) in _read_tensors(path).items()}


def tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """key -> (first byte, end) of each tensor's data in the safetensors file ``path`` (checked
    as :func:`read_header` checks it)."""
    return {k: span for k, (_, _, span) in _read_tensors(path).items()}


def _read_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """key -> (dtype, shape, (first byte, end) in the file), the header checked (read_header)."""
    hint = "re-download or re-copy it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoECompressError(f"weight file '{path}' is truncated ({size} bytes, no header); {hint}")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise MoECompressError(f"weight file '{path}' is truncated or not a safetensors file "
                                       f"(header of {n} bytes in a {size}-byte file); {hint}")
            raw = f.read(n)
    except OSError as e:
        raise MoECompressError(f"cannot read weight file '{path}': {e.strerror or e}") from None
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError
        tensors = {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in meta.items()
                   if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise MoECompressError(f"weight file '{path}' has a corrupt header (not safetensors JSON); {hint}") from None
    end = max((o[1] for _, _, o in tensors.values()), default=0)
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "longer than its header says"
        raise MoECompressError(f"weight file '{path}' is {what} ({size} bytes, its header describes "
                               f"{8 + n + end}); {hint}")
    for k, (dt, shape, (b, e)) in tensors.items():
        numel = 1
        for d in shape:
            numel *= d
        if dt in _ITEMSIZE and dt != "F4" and (e - b) != numel * _ITEMSIZE[dt]:
            raise MoECompressError(f"weight file '{path}' is corrupt: tensor '{k}' has {e - b} bytes for shape "
                                   f"{list(shape)} {dt}; {hint}")
    return {k: (dt, shape, (8 + n + b, 8 + n + e)) for k, (dt, shape, (b, e)) in tensors.items()}


def check_shards(folder: str | os.PathLike) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """Headers of every safetensors file of ``folder`` (file name -> key -> (dtype, shape)).

    Refuses (one line naming the file) a shard the index lists that is missing, a truncated or
    corrupt shard, and a folder with no weights at all.
    """
    folder = Path(folder)
    index = folder / SHARD_INDEX
    names = set()
    if index.exists():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise MoECompressError(f"'{index}' is not a valid safetensors index (JSON with a weight_map); "
                                   "re-download the checkpoint") from None
        names = set(weight_map.values())
        for name in sorted(names):
            if not (folder / name).is_file():
                raise MoECompressError(f"shard '{folder / name}' is missing (listed in {SHARD_INDEX}); "
                                       "re-download the checkpoint")
    names |= {p.name for p in folder.glob("*.safetensors")}
    if not names and not any(folder.glob("*.bin")):
        raise MoECompressError(f"'{folder}' has no weight files (*.safetensors); pass a complete checkpoint folder")
    return {name: read_header(folder / name) for name in sorted(names)}


def first_nonfinite(folder: str | os.PathLike, headers: dict | None = None, device: str | None = None,
                    stop: threading.Event | None = None) -> str | None:
    """The first tensor (file order, then key order) holding NaN or Inf, or None. Files this
    process wrote from tensors it had scanned (:func:`note_finite_file`), unchanged since, are not
    read again. ``stop`` set: the scan ends at its next slice with ``InterruptedError`` (never a
    verdict)."""
    from safetensors import safe_open

    folder = Path(folder)
    headers = check_shards(folder) if headers is None else headers
    dev = torch.device(device or "cpu")
    for name in sorted(headers):
        if _file_stamp(folder / name) in _finite_files:
            continue
        with safe_open(folder / name, framework="pt") as f:
            for key in sorted(headers[name]):
                st_dtype, shape = headers[name][key]
                if st_dtype not in _FLOAT or 0 in shape:
                    continue
                if not shape:  # scalar
                    if not bool(torch.isfinite(f.get_tensor(key).float()).all()):
                        return key
                    continue
                sl = f.get_slice(key)
                rows = shape[0]
                row_bytes = max(1, _ITEMSIZE[st_dtype] * (_numel(shape) // rows))
                step = max(1, _CHUNK_BYTES // row_bytes)
                for r0 in range(0, rows, step):
                    if stop is not None and stop.is_set():
                        raise InterruptedError("input scan stopped")
                    if _values_nonfinite(sl[r0:min(rows, r0 + step)].to(dev)):
                        return key
    return None


# Safetensors files written by this process from tensors scanned in memory before writing
# (shard surgery): (path, size, mtime_ns). Checking an output then needs no second read of it:
# on the Qwen3-30B-A3B shape streamed, the output check re-read the 32 GB just written (page cache
# evicted under the run's memory use), about 25 s of a 142 s prune (docs/benchmarks.md).
_finite_files: set[tuple[str, int, int]] = set()


def _file_stamp(path: Path) -> tuple[str, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def first_nonfinite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key (sorted) of in-memory ``tensors`` holding NaN or Inf, by the same rules as
    the file scan (float8_e4m3fn: its NaN codes; integers and packed formats are not values)."""
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype in _FLOAT_DTYPES and t.numel() and _values_nonfinite(t):
            return key
    return None


def _values_nonfinite(t: torch.Tensor) -> bool:
    """NaN or Inf in a non-empty floating tensor (or slice) of a checkpoint's stored dtype."""
    if t.dtype == torch.float8_e4m3fn:
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())  # e4m3fn has NaN codes only
    return has_nonfinite(t.float() if t.dtype == torch.float8_e5m2 else t)


def note_finite_file(path: str | os.PathLike) -> None:
    """``path`` was just written from tensors :func:`first_nonfinite_tensor` found finite: later
    scans in this process skip it while its size and modification time are unchanged."""
    stamp = _file_stamp(Path(path))
    if stamp is not None:
        _finite_files.add(stamp)


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether the (non-empty, floating) tensor ``t`` holds NaN or +-Inf: its minimum and
    maximum are both finite exactly when every value is (``aminmax`` propagates NaN, and an
    infinity is the minimum or the maximum). One reduction pass: on the CPU about 50x faster
    than ``isfinite(t).all()`` in bf16, which materialises a bool tensor per value (0.11 GB/s
    on one core, so the input check of a 14 GB checkpoint took longer than reading it)."""
    lo, hi = torch.aminmax(t)
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def require_sound_input(folder: str | os.PathLike | None, *, allow_nonfinite: bool = False, wait: bool = True) -> None:
    """:func:`check_shards` and (unless ``allow_nonfinite``) :func:`first_nonfinite` on an input
    checkpoint, once per process for the same files (a command loads its input more than once).

    ``wait=False`` checks the headers now and starts the value scan in a background thread; a
    later call with ``wait=True`` waits for its verdict. A command starts it when it opens its
    input and waits for it once the model is loaded (``checkpoint.load_model``) and before its
    output becomes the output folder (``checkpoint.output_folder``): the scan reads the files
    while the load reads them, instead of one full read before the load (on the OLMoE-1B-7B
    shape in GPU memory, 9.7 s from a cold disk, then 3.0 s to load from the page cache,
    docs/benchmarks.md). No weight is used before the verdict, and a bad input still ends the
    command with this one-line error and nothing written. A model whose layers load in the
    background (``layerload``) takes the scan over: it checks each layer's values as they load
    (:func:`take_over_scan`)."""
    if folder is None:
        return
    folder = Path(folder)
    key = _scan_key(folder, allow_nonfinite)
    if key in _checked:
        return
    scan = _scans.get(key)
    if scan is None:
        headers = check_shards(folder)
        if allow_nonfinite:
            _checked.add(key)
            return
        scan = _scans[key] = Background(lambda stop: first_nonfinite(folder, headers, stop=stop),
                                        "moecompress-input-scan")
    if not wait:
        return
    del _scans[key]
    bad = scan.result()
    if bad is not None:
        raise nonfinite_input(bad, folder)
    _checked.add(key)


def nonfinite_input(key: str, folder: str | os.PathLike) -> MoECompressError:
    """The one-line error for an input tensor ``key`` of ``folder`` holding NaN or Inf."""
    return MoECompressError(f"input weight '{key}' holds NaN or Inf (in '{folder}'); the checkpoint is damaged: "
                            "re-download it, or pass --allow-nonfinite to proceed anyway")


_scans: dict[tuple, Background] = {}  # started, not yet waited for


def _scan_key(folder: Path, allow_nonfinite: bool) -> tuple:
    try:  # the files as they are now (a rewritten checkpoint is checked again)
        stamp = tuple(sorted(filter(None, (_file_stamp(p) for p in folder.iterdir()
                                           if p.name.endswith((".safetensors", ".json"))))))
    except OSError:
        stamp = ()
    return str(folder.resolve()), stamp, allow_nonfinite


def take_over_scan(folder: str | os.PathLike, *, allow_nonfinite: bool = False):
    """Stop the background value scan of ``folder`` (if one runs): the caller checks every value
    itself as it loads them (``layerload``, on the device: the scan's page faults and slices
    would hold the interpreter's lock beside the computation). Returns ``done()``, to call once
    every tensor was found finite, after which :func:`require_sound_input` passes without a scan."""
    folder = Path(folder)
    key = _scan_key(folder, allow_nonfinite)
    scan = _scans.pop(key, None)
    if scan is not None:
        scan.stop.set()
    return lambda: _checked.add(key)


_LINE_BREAKS = str.maketrans("", "", "\n\r\t")  # removed: the whitespace check_text accepts besides printables


def check_text(text_or_bytes: str | bytes, where: str, *, min_printable: float = 0.9, partial: bool = False) -> str:
    """Calibration text: valid UTF-8 and at least ``min_printable`` printable characters
    (letters, digits, punctuation, whitespace), else one line naming ``where``. ``partial``:
    the bytes are the start of a longer file (a character cut at the end is not an error)."""
    if isinstance(text_or_bytes, bytes):
        try:
            text = text_or_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            if partial and e.reason == "unexpected end of data" and e.start >= len(text_or_bytes) - 3:
                return check_text(text_or_bytes[:e.start], where, min_printable=min_printable)
            raise MoECompressError(f"calibration source '{where}' is not UTF-8 text (invalid byte at offset "
                                   f"{e.start}); pass a text file") from None
    else:
        text = text_or_bytes
    sample = text[:1_000_000]
    if sample and not sample.translate(_LINE_BREAKS).isprintable():  # the usual case in one C call
        printable = sum(c.isprintable() or c in "\n\r\t" for c in sample)
        if printable / len(sample) < min_printable:
            raise MoECompressError(f"calibration source '{where}' is mostly non-printable characters "
                                   f"({1 - printable / len(sample):.0%}); pass a text file")
    return text
