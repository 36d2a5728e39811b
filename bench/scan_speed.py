"""Speed of the input's NaN/Inf scan (``integrity.first_nonfinite``, run before every stage loads
a checkpoint), from a dropped page cache and from a warm one.

  python bench/scan_speed.py FOLDER --json OUT.json

(Session 7 also timed a variant scanning the files on 8 threads, passed as ``--workers``; it was
no faster and is not in the library: docs/benchmarks.md, "The default end to end".)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import drop_cache, folder_bytes  # noqa: E402

from moecompress.integrity import first_nonfinite  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    size = folder_bytes(a.folder)
    rows = []
    for cache in ("dropped", "warm"):
        if cache == "dropped":
            drop_cache(a.folder)
        t = time.perf_counter()
        bad = first_nonfinite(a.folder)
        s = time.perf_counter() - t
        rows.append({"cache": cache, "s": s, "GBps": size / s / 1e9, "found": bad})
        print(json.dumps(rows[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"folder": str(a.folder), "bytes": size,
                                      "files": len(list(a.folder.glob("*.safetensors"))), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
