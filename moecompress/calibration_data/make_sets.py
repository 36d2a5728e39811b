"""Rebuild the shipped calibration sets from permissively licensed text found on this machine.

    python calibration/make_sets.py          # writes the files next to this script

Deterministic for a given Python / NumPy version (the committed files are the reference;
rebuilding with other versions changes the text, not the format). Sources and licences are
listed in README.md.
"""

from __future__ import annotations

import inspect
import json
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
STDLIB = Path(sysconfig.get_paths()["stdlib"])

# Pure-Python standard-library modules of readable, commented code (PSF-2.0).
CODE_MODULES = ["textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "shlex.py",
                "string.py", "colorsys.py", "graphlib.py", "difflib.py", "calendar.py", "csv.py",
                "json/decoder.py", "json/encoder.py", "dataclasses.py", "functools.py", "queue.py",
                "sched.py", "fnmatch.py", "glob.py", "contextlib.py", "operator.py", "reprlib.py"]
CODE_BUDGET = 400_000
DOCS_BUDGET = 400_000
NUMPY_BUDGET = 300_000


def python_code() -> str:
    parts, size = [], 0
    for name in CODE_MODULES:
        text = (STDLIB / name).read_text(encoding="utf-8")
        if size + len(text) > CODE_BUDGET:
            continue
        parts.append(f"# file: Lib/{name}\n{text}")
        size += len(text)
    return "\n\n".join(parts)


def python_docs() -> str:
    from pydoc_data.topics import topics  # the Language Reference / Library text behind help()

    parts, size = [], 0
    for key in sorted(topics):
        text = topics[key].strip()
        if size + len(text) > DOCS_BUDGET:
            break
        parts.append(text)
        size += len(text)
    return "\n\n".join(parts)


def numpy_docstrings() -> list[dict]:
    import numpy

    rows, size = [], 0
    for modname in ("numpy", "numpy.linalg", "numpy.fft", "numpy.polynomial.polynomial"):
        mod = __import__(modname, fromlist=["_"])
        for name in sorted(dir(mod)):
            if name.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, name, None)) or ""
            if len(doc) < 800 or size + len(doc) > NUMPY_BUDGET:
                continue
            rows.append({"text": doc, "source": f"{modname}.{name}", "numpy": numpy.__version__})
            size += len(doc)
    return rows


def main() -> None:
    (HERE / "python_code.txt").write_text(python_code() + "\n", encoding="utf-8")
    (HERE / "python_docs.txt").write_text(python_docs() + "\n", encoding="utf-8")
    with open(HERE / "numpy_docs.jsonl", "w", encoding="utf-8") as f:
        for row in numpy_docstrings():
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
