"""The :class:`Stats` container: per-MoE-layer tensors plus metadata, saved as safetensors.

Tensors are keyed ``layers.{layer_idx}.{name}`` (``layer_idx`` is the decoder-layer index).
``save`` writes the safetensors file (metadata JSON in its header) and a JSON summary beside
it; both are byte-identical for identical inputs (no timestamps, sorted keys).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from ..errors import MoECompressError

FORMAT = "moecompress.stats/1"
_META_KEY = "moecompress_stats"


def summary_path(path: str | os.PathLike) -> Path:
    """The JSON summary written beside ``path`` (same name, ``.json`` suffix)."""
    return Path(path).with_suffix(".json")


@dataclass
class Stats:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ----- access ----------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.meta.get("layers") or sorted({int(k.split(".")[1]) for k in self.tensors}))

    @property
    def names(self) -> list[str]:
        """Statistic names present (for the first layer)."""
        first = f"layers.{self.layers[0]}." if self.layers else ""
        return sorted(k[len(first):] for k in self.tensors if k.startswith(first))

    def get(self, layer_idx: int, name: str) -> torch.Tensor:
        key = f"layers.{layer_idx}.{name}"
        if key not in self.tensors:
            raise KeyError(f"no statistic '{name}' for layer {layer_idx} (have: {', '.join(self.names)})")
        return self.tensors[key]

    def set(self, layer_idx: int, name: str, value: torch.Tensor) -> None:
        self.tensors[f"layers.{layer_idx}.{name}"] = value

    def layer_dict(self, layer_idx: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{layer_idx}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    # ----- persistence -----------------------------------------------------------------
    def summary(self) -> dict:
        """A small JSON-able digest: metadata plus per-layer scalars and top experts."""
        from .summary import summarize

        return summarize(self)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(self.tensors.items())}
        meta = {_META_KEY: json.dumps({"format": FORMAT, **self.meta}, sort_keys=True)}
        from ..outputs import atomic_write, clean_stale

        clean_stale(path)  # what killed runs left
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-stats")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        atomic_write(summary_path(path), json.dumps(self.summary(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Stats":
        path = Path(path)
        if not path.is_file():
            raise MoECompressError(f"statistics file '{path}' not found; create it with `moecompress stats MODEL -o {path}`")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
        except Exception as e:  # not a safetensors file
            raise MoECompressError(f"'{path}' is not a statistics file written by `moecompress stats` ({type(e).__name__})") from None
        if _META_KEY not in header:
            raise MoECompressError(f"'{path}' is a safetensors file but holds no moecompress statistics")
        meta = json.loads(header[_META_KEY])
        meta.pop("format", None)
        return cls(tensors=tensors, meta=meta)
