"""Where a command may write, and how it survives being killed.

Guarantees (README "Errors and guarantees"; ``checkpoint.output_folder`` and
:func:`atomic_write` apply them):

* an output is never the input, inside it, or a folder that contains it (symlinks resolved
  both ways), with or without ``--overwrite``;
* ``--overwrite`` replaces only an empty folder or a previous moecompress output (one that
  holds ``moecompress.json``); any other folder is refused by name;
* work happens in a hidden sibling ``.OUT.tmp-<pid>-*`` that is renamed into place when
  complete; the running process holds an ``flock`` on a lock file in it, so a later run can
  tell a dead run's leftovers (lock free, or no lock and its pid gone) from a live run's and
  removes them on start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import MoECompressError

RECORD_FILE = "moecompress.json"
LOCK_FILE = ".moecompress-lock"


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def check_not_input(out: str | os.PathLike, source: str | os.PathLike | None) -> None:
    """Refuse ``out`` equal to, inside, or containing the local input ``source``."""
    if source is None:
        return
    src = Path(str(source)).expanduser()
    if not src.exists():
        return  # a Hub id
    src, dst = src.resolve(), _resolved(out)
    if dst == src or src in dst.parents:
        raise MoECompressError(f"output '{out}' is inside the input checkpoint '{source}'; choose another folder")
    if dst in src.parents:
        raise MoECompressError(f"output '{out}' contains the input checkpoint '{source}' (replacing it would delete "
                               "the input); choose another folder")


def check_output_folder(out: Path, *, overwrite: bool, source: str | os.PathLike | None) -> None:
    """All output-folder refusals, before any work."""
    check_not_input(out, source)
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise MoECompressError(f"output '{out}' exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise MoECompressError(f"output '{out}' is a file; choose a folder path")
    if out.is_symlink():
        raise MoECompressError(f"output '{out}' is a symlink; --overwrite replaces only real folders, choose another path")
    if not (out / RECORD_FILE).is_file() and any(out.iterdir()):
        raise MoECompressError(f"--overwrite refuses to replace '{out}': it is not empty and not a moecompress output "
                               f"(no {RECORD_FILE}); delete it yourself or choose another folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _lock_free(lock: Path) -> bool:
    """True if nobody holds the flock of ``lock`` (its run is dead)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: fall back to the pid
        return False
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases our probe lock


def is_stale(tmp: Path) -> bool:
    """A ``.NAME.tmp-<pid>-*`` left by a run that is no longer alive."""
    lock = tmp / LOCK_FILE
    if tmp.is_dir() and lock.exists():
        return _lock_free(lock)
    try:
        pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False  # not ours (an older version's name): leave it
    return pid != os.getpid() and not _pid_alive(pid)


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` that dead runs left; returns what was removed."""
    removed = []
    with contextlib.suppress(OSError):
        for p in out.parent.glob(f".{out.name}.tmp-*"):
            if is_stale(p):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


class LockedTemp:
    """A hidden temporary folder beside ``out``, locked while this process works in it."""

    def __init__(self, out: Path):
        self.out = out
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        self._fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def commit(self) -> None:
        """Make the folder ``out`` (replacing a previous output through a stale-named sibling,
        so a kill between the two renames leaves nothing a later run does not clean)."""
        (self.path / LOCK_FILE).unlink(missing_ok=True)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-old"
            os.replace(self.out, old)
        os.replace(self.path, self.out)
        self.release()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def normal_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and some writers 0600 files); give the output the modes
    the user's umask gives any new file, so that other users and containers can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def check_output_file(path: str | os.PathLike, *, source: str | os.PathLike | None = None,
                      overwrite: bool = True) -> Path:
    """A single output file: never inside (or equal to) the input, not a folder."""
    p = Path(path).expanduser()
    check_not_input(p, source)
    if p.is_dir():
        raise MoECompressError(f"output '{path}' is a folder; pass a file path")
    if p.exists() and not overwrite:
        raise MoECompressError(f"'{path}' already exists; pass --overwrite to replace it")
    return p


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``path`` through a temporary sibling and a rename: a kill leaves the old file or
    the new one, never half of one."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise MoECompressError(f"output '{path}' is a folder; pass a file path")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(p)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-{os.getpid()}-", dir=p.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual modes
        os.replace(tmp, p)
    except OSError as e:
        with contextlib.suppress(Exception):
            os.unlink(tmp)
        raise MoECompressError(f"cannot write '{path}': {e.strerror or e}") from None
    return p
