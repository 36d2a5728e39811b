"""One exception type for every mistake a user can make.

The CLI turns it into one line on stderr and exit code 2 (no traceback); library callers
catch it like any other exception. The message must say what to do, not only what failed.
"""


class MoECompressError(Exception):
    """Bad input: wrong path, unsupported model, out-of-range option, malformed recipe..."""


def translate(e: BaseException) -> str | None:
    """A one-line, actionable message for an exception a user's input or machine can cause
    outside moecompress's own checks (None: a bug; the CLI then asks for ``--debug``)."""
    import errno

    text = str(e)
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    name = type(e).__name__
    if isinstance(e, MoECompressError):
        return text
    if name == "SafetensorError":
        return f"a weight file is corrupt or truncated ({first}); re-download or re-copy the checkpoint"
    if "Torch not compiled with CUDA" in text or "no NVIDIA driver" in text or "CUDA driver" in text:
        return "no CUDA GPU is usable on this machine; use --device cpu"
    if name == "OutOfMemoryError" or "CUDA out of memory" in text:
        return ("out of GPU memory; lower --batch-size or stream the model with --max-gpu-memory "
                "(or use --device cpu)")
    if isinstance(e, MemoryError):
        return "out of CPU memory; lower --batch-size / -n, or stream with --max-cpu-memory"
    if "trust_remote_code" in text:
        from .guards import REMOTE_CODE_HINT

        return f"the checkpoint needs its own Python code; {REMOTE_CODE_HINT}"
    if isinstance(e, OSError) and e.errno is not None:
        where = f" '{e.filename}'" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on the device writing{where}; free space or choose another output folder"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"permission denied{where} ({e.strerror}); choose a folder you can write to"
        if e.errno == errno.ENOENT:
            return f"file or folder not found{where}; check the path"
        return f"{e.strerror or first}{where}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({first}); pass a UTF-8 text file"
    return None
