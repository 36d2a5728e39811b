"""A checkpoint source, resolved once per command and passed down.

``open_source("org/name" | folder)`` reads the config, finds the family, the stored dtype and
(for a local folder or a cached Hub snapshot) the safetensors shards and their index. Every
stage takes a :class:`Source` or a string; library functions call :func:`open_source`, which
returns a ``Source`` unchanged, so a command resolves its input exactly once.

This module imports neither ``checkpoint`` nor ``surgery`` (both import it), which keeps the
import graph free of cycles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MoECompressError

RECORD_FILE = "moecompress.json"
SHARD_INDEX = "model.safetensors.index.json"


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def resolve_source(src: str | os.PathLike) -> Path | str:
    """A local folder as a Path, or a Hub id as a string; a clear error for anything else."""
    if isinstance(src, Source):
        return src.location
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise MoECompressError(f"'{src}' is a file; pass the checkpoint folder that holds config.json")
        if not (p / "config.json").exists():
            raise MoECompressError(f"'{src}' has no config.json; pass a Hugging Face checkpoint folder")
        return p
    s = str(src)
    if s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise MoECompressError(f"model '{src}' not found: pass a local checkpoint folder or a Hub id like org/name")
    return s


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect instead of huggingface_hub's ~30 s of retries when offline."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


def _check_hub_source(source: Path | str) -> None:
    """A Hub id must be in the local cache or the Hub must answer; say so in one line."""
    if isinstance(source, Path):
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return
    except Exception:
        pass
    if not _hub_reachable():
        raise MoECompressError(f"'{source}' is not a local folder, not in the Hugging Face cache, and the Hub is unreachable; "
                               "download it first or pass a local checkpoint folder")


def _strict_config_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's validation errors of strict dataclasses (transformers 5's configs)."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub: configs are not validated
        return ()
    return (StrictDataclassError,)


_STRICT_CONFIG_ERRORS = _strict_config_errors()


def load_config(src: str | os.PathLike):
    if isinstance(src, Source):
        return src.config
    from transformers import AutoConfig

    from .guards import check_remote_code, load_error, trust_remote_code

    source = resolve_source(src)
    _check_hub_source(source)
    check_remote_code(source if isinstance(source, Path) else source_folder(source), str(src))
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code())
    except (OSError, ValueError) as e:
        raise MoECompressError(load_error("cannot read the config of", src, e)) from None
    except _STRICT_CONFIG_ERRORS as e:  # transformers 5's config classes check their fields and shapes
        raise MoECompressError(f"the config of '{src}' is not valid for its model type ({first_line(e.__cause__ or e)}); "
                               "fix its config.json or re-download the checkpoint") from None


def stored_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint stores its weights in (config.dtype / torch_dtype); read it
    before loading, since loading with another dtype rewrites config.dtype."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def source_folder(src: str | os.PathLike) -> Path | None:
    """Local folder of a model (for a Hub id, its cached snapshot when present)."""
    source = resolve_source(src)
    if isinstance(source, Path):
        return source
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        return None


def load_record(src: str | os.PathLike) -> dict | None:
    folder = source_folder(src)
    if folder is not None and (folder / RECORD_FILE).exists():
        return json.loads((folder / RECORD_FILE).read_text())
    return None


@dataclass(eq=False)
class Source:
    """One checkpoint: what was given, where it is, its config, family and stored dtype."""

    name: str  # as the user gave it (recorded in moecompress.json)
    location: Path | str  # a local folder, or a Hub id
    config: Any
    family: Any  # arch.FamilySpec
    stored_dtype: torch.dtype | None
    _folder: Path | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.name

    def __fspath__(self) -> str:
        return str(self.location)

    @property
    def num_experts(self) -> int:
        return int(getattr(self.config, self.family.num_experts_field))

    @property
    def top_k(self) -> int:
        return int(getattr(self.config, self.family.top_k_field))

    @property
    def folder(self) -> Path | None:
        """The local folder (a Hub id's cached snapshot, looked up again until it exists:
        loading the model downloads it)."""
        if self._folder is None:
            self._folder = source_folder(self.location)
        return self._folder

    @property
    def shards(self) -> list[Path]:
        """The safetensors shards (in index order when there is an index); [] when none are local."""
        folder = self.folder
        if folder is None:
            return []
        index = self.index
        if index is not None:
            return [folder / f for f in sorted(set(index["weight_map"].values()))]
        return sorted(folder.glob("*.safetensors"))

    @property
    def index(self) -> dict | None:
        folder = self.folder
        if folder is not None and (folder / SHARD_INDEX).exists():
            return json.loads((folder / SHARD_INDEX).read_text())
        return None

    def record(self) -> dict | None:
        return load_record(self.location)

    def tokenizer(self):
        return load_tokenizer(self.location, self.name)


# Text any real tokenizer turns into tokens (a tokenizer built without its files gives none).
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"


def load_tokenizer(location, name: str | None = None):
    """The tokenizer of the checkpoint at ``location`` (a folder or a Hub id), or one line saying
    why not. transformers 5 builds a tokenizer of the config's model type without any vocabulary
    when the folder has no tokenizer files: it turns every text into no tokens, so that
    calibration and perplexity would fail later with a message about the text. Refused here."""
    from transformers import AutoTokenizer

    from .guards import trust_remote_code

    name = name or str(location)
    hint = "copy tokenizer.json and tokenizer_config.json from the model it came from"
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code())
    except (OSError, ValueError) as e:
        raise MoECompressError(f"cannot load the tokenizer of '{name}': {first_line(e)}; {hint}") from None
    if not tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise MoECompressError(f"'{name}' has no usable tokenizer (it turns text into no tokens: its tokenizer files "
                               f"are missing); {hint}")
    return tokenizer


def read_source(src: str | os.PathLike) -> Source:
    """``src`` resolved and its config read (no weight file is touched): a clear one-line error
    for a missing folder, an unreachable Hub id or a model that is not a supported MoE family."""
    from .arch import family_for_config

    location = resolve_source(src)
    config = load_config(location)
    return Source(name=str(src), location=location, config=config, family=family_for_config(config),
                  stored_dtype=stored_dtype(config))


def open_source(src: str | os.PathLike | Source) -> Source:
    """Resolve ``src`` once (:func:`read_source`), and refuse a truncated or missing shard;
    NaN/Inf weights (``integrity``) are scanned for in the background and refused before any
    weight is used."""
    if isinstance(src, Source):
        return src
    from .guards import load_policy
    from .integrity import require_sound_input

    source = read_source(src)
    # every shard complete now; the NaN/Inf scan starts in the background and its verdict comes
    # before any weight is used (load_model) or an output is committed (output_folder)
    require_sound_input(source.folder, allow_nonfinite=load_policy().allow_nonfinite, wait=False)
    return source
