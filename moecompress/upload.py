"""Publish a compressed checkpoint to the Hugging Face Hub: model card, repository, files.

``upload`` never writes into ``DIR`` (it may be the user's only copy, with a README of its
own): it builds a staging folder of symlinks to ``DIR``'s files plus the model card
``README.md`` (see :mod:`moecompress.card`) and uploads that with huggingface_hub's
``HfApi.create_repo`` and ``HfApi.upload_folder``. A dry run keeps the staging folder so the
card can be read; ``card_in_place`` (``--card-in-place``) writes ``DIR/README.md`` instead.
The token comes from ``token=``, else huggingface_hub's standard places (``HF_TOKEN``, the file written by ``hf auth login``).
``endpoint`` (or ``HF_ENDPOINT``) points at another Hub, e.g. a local test server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .card import write_card
from .checkpoint import _first_line
from .errors import MoECompressError
from .options import UploadOptions, library_function

# Hidden files and folders (temporary outputs, caches, .git) are never sent.
IGNORE_PATTERNS = [".*", "*/.*"]
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def check_folder(folder: str | os.PathLike) -> Path:
    """A checkpoint folder with a config and weights, or a clear error."""
    p = Path(folder).expanduser()
    if not p.exists():
        raise MoECompressError(f"folder '{folder}' not found; pass the output folder of a moecompress stage")
    if not p.is_dir():
        raise MoECompressError(f"'{folder}' is a file; pass the checkpoint folder")
    if not (p / "config.json").is_file():
        raise MoECompressError(f"'{folder}' has no config.json; pass a Hugging Face checkpoint folder")
    if not any(f.name.endswith(_WEIGHT_SUFFIXES) for f in p.iterdir() if f.is_file()):
        raise MoECompressError(f"'{folder}' has no weight files (*.safetensors); save the model there first")
    return p


def files_to_send(folder: Path) -> list[tuple[str, int]]:
    """``(path in repo, bytes)`` of every file ``upload_folder`` sends (same filter)."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS)
    return [(p, (folder / p).stat().st_size) for p in kept]


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise MoECompressError(f"invalid repository id '{repo_id}': {_first_line(e)}") from None
    if repo_id.count("/") != 1:
        raise MoECompressError(f"repository id '{repo_id}' must be 'user-or-org/name'")


@library_function(UploadOptions)
def upload(folder: str | os.PathLike, *, opts: UploadOptions) -> dict:
    """Write the model card, then (unless ``dry_run``) create the repo and upload the folder.

    Returns ``{"repo_id", "card", "files": [{"path", "bytes"}], "bytes", "dry_run", "url"}``.
    """
    repo_id, private, token, dry_run = opts.repo_id, opts.private, opts.token, opts.dry_run
    endpoint, base_model, commit_message = opts.endpoint, opts.base_model, opts.commit_message
    p = check_folder(folder)
    _check_repo_id(repo_id)
    if not dry_run:
        token = _require_token(token)
    staging = p if opts.card_in_place else stage(p)
    try:
        card = write_card(staging, repo_id, base_model=base_model)
        files = files_to_send(staging)
        out = {"repo_id": repo_id, "card": str(card), "files": [{"path": f, "bytes": n} for f, n in files],
               "bytes": sum(n for _, n in files), "dry_run": dry_run, "url": None}
        if dry_run:
            return out  # the staging folder stays, so that the card can be read
        out.update(_send(staging, repo_id, private=private, token=token, endpoint=endpoint,
                         commit_message=commit_message))
        return out
    finally:
        if staging != p and not dry_run:
            shutil.rmtree(staging, ignore_errors=True)


def stage(folder: Path) -> Path:
    """A temporary folder mirroring ``folder`` with symlinks (no data copied; hidden files left
    out as ``upload_folder`` leaves them out; a README.md of the folder is replaced by the card)."""
    staging = Path(tempfile.mkdtemp(prefix="moecompress-upload-"))
    for rel, _ in files_to_send(folder):
        if rel != "README.md":
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink((folder / rel).resolve(), dst)
    return staging


def _require_token(token: str | None) -> str:
    from huggingface_hub import constants, get_token

    token = token or get_token()
    if not token:
        raise MoECompressError("no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass --token "
                               "(use --dry-run to only write the card)")
    if constants.HF_HUB_OFFLINE:
        raise MoECompressError("HF_HUB_OFFLINE is set; unset it to upload (or use --dry-run)")
    return token


def _send(p: Path, repo_id: str, *, private: bool, token: str, endpoint: str | None,
          commit_message: str | None) -> dict:
    """Create the repository and upload ``p``; ``{"url", "commit"}``."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(endpoint=endpoint, token=token)
    where = api.endpoint
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=p, repo_id=repo_id, ignore_patterns=IGNORE_PATTERNS,
                                   commit_message=commit_message or "Upload compressed checkpoint (moecompress)")
    except OfflineModeIsEnabled:
        raise MoECompressError("HF_HUB_OFFLINE is set; unset it to upload (or use --dry-run)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise MoECompressError(f"the Hub at {where} rejected the token (401); check it with `hf auth whoami` "
                                   "or pass another with --token") from None
        if status == 403:
            raise MoECompressError(f"no write access to '{repo_id}' (403); use a token with write permission "
                                   "for that user or organisation") from None
        raise MoECompressError(f"the Hub at {where} refused the upload: {_first_line(e)}") from None
    except (OSError, *_transport_errors()) as e:
        raise MoECompressError(f"cannot reach the Hugging Face Hub at {where} ({_first_line(e)}); check the "
                               "network or HF_ENDPOINT, or use --dry-run") from None
    return {"url": str(url), "commit": getattr(commit, "oid", None)}


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of the HTTP client huggingface_hub uses (httpx in 1.x, httpx2 in 2.x)."""
    import importlib

    errors: list[type[BaseException]] = [ConnectionError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
