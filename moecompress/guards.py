"""What loading an input is allowed to do: remote code, non-finite weights, the device.

The policy is a context variable so that every ``from_pretrained`` of a command sees the same
answer without threading two flags through every stage's signature: the CLI sets it from
``--trust-remote-code`` / ``--allow-nonfinite`` (``cli.py``), a library caller uses
``with loading_policy(trust_remote_code=True): ...`` or passes the flag to ``load_model``.

Remote code is never trusted by default and transformers is never left to decide: it would
ask "Do you wish to run the custom code? [y/N]" on a terminal (and read the answer from a
pipe: ``echo y | moecompress info DIR`` ran the folder's code). Every ``from_pretrained`` in
moecompress passes ``trust_remote_code=trust_remote_code()`` explicitly, and a checkpoint whose
``auto_map`` names code that transformers has no built-in class for is refused before
transformers is called, with one line naming ``--trust-remote-code``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from .errors import MoECompressError


@dataclass(frozen=True)
class LoadPolicy:
    trust_remote_code: bool = False
    allow_nonfinite: bool = False


_POLICY: contextvars.ContextVar[LoadPolicy] = contextvars.ContextVar("moecompress_load_policy", default=LoadPolicy())


def load_policy() -> LoadPolicy:
    return _POLICY.get()


def trust_remote_code() -> bool:
    return _POLICY.get().trust_remote_code


@contextlib.contextmanager
def loading_policy(**changes) -> Iterator[LoadPolicy]:
    """Within the block, loading follows ``changes`` (trust_remote_code, allow_nonfinite)."""
    token = _POLICY.set(replace(_POLICY.get(), **changes))
    try:
        yield _POLICY.get()
    finally:
        _POLICY.reset(token)


def set_policy(**changes) -> None:
    """Set the policy for the rest of this context (the CLI: one command per process)."""
    _POLICY.set(replace(_POLICY.get(), **changes))


REMOTE_CODE_HINT = "pass --trust-remote-code if you trust its code (it runs on your machine)"


def check_remote_code(folder: Path | None, label: str) -> None:
    """Refuse a local checkpoint that needs its own Python code when it is not trusted.

    transformers uses its built-in class when it knows the ``model_type`` even if ``auto_map``
    names custom code (e.g. DeepSeek-V3); only a type it does not know needs the folder's code.
    """
    if folder is None or trust_remote_code():
        return
    for name, key in (("config.json", "model_type"), ("tokenizer_config.json", "tokenizer_class")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError, OSError):
            if name == "config.json":
                raise MoECompressError(f"'{path}' is not valid JSON; re-download the checkpoint") from None
            continue
        if not isinstance(data, dict) or not data.get("auto_map"):
            continue
        if name == "config.json":
            from transformers import CONFIG_MAPPING

            if data.get("model_type") in CONFIG_MAPPING:
                continue
        elif data.get(key) and _known_tokenizer(str(data[key])):
            continue
        raise MoECompressError(f"'{label}' needs its own Python code ({name} auto_map); {REMOTE_CODE_HINT}")


def load_error(what: str, src, e: BaseException) -> str:
    """One line for a transformers loading error (the remote-code one names the flag)."""
    if "trust_remote_code" in str(e):
        return f"'{src}' needs its own Python code; {REMOTE_CODE_HINT}"
    return f"{what} '{src}': {(str(e).strip().splitlines() or [type(e).__name__])[0]}"


def _known_tokenizer(name: str) -> bool:
    import transformers

    return hasattr(transformers, name) or hasattr(transformers, name.removesuffix("Fast"))


def check_device(device: str | None) -> None:
    """``--device cuda`` without a usable GPU, or a device torch does not know: one line."""
    if device is None or device in ("auto", "cpu"):
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MoECompressError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MoECompressError(f"--device {device}: no CUDA GPU is usable here (torch {torch.__version__}, "
                                   f"cuda {'built' if torch.backends.cuda.is_built() else 'not built'}); "
                                   "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoECompressError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here; "
                                   f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise MoECompressError(f"--device {device}: MPS is not available here; use --device cpu")
