"""The default prune's two re-fit schedules on the CPU, with the layers loading in the background.

``prune.checkpoint.refit_schedule`` re-fits each layer as soon as NAEE has chosen it
(``repair.PruneRepair``) for a streamed model, and after the whole selection in memory, where
the layers load in the background (``layerload``) while the selection runs. This times both in
memory on a testbed model (CPU, ``layerload.ON_CPU``), with each layer's load slowed by
``--load-delays`` seconds (a sleep, which frees the interpreter's lock as a disk read does), and
checks that both write the same bytes. It shows the mechanism only: what a GPU gains or loses
comes from ``bench/scale.py --also-schedules`` (session 15 measured the re-fit beside the
loading slower on the GPU, which is why memory keeps the re-fit after the selection).

  OMP_NUM_THREADS=1 python bench/layerwise_schedule.py --json bench/results/layerwise_schedule_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moecompress import layerload  # noqa: E402
from moecompress.prune import checkpoint as prune_module  # noqa: E402
from moecompress.prune import prune_checkpoint  # noqa: E402

TESTBED = Path(__file__).resolve().parents[2] / "shared" / "testbed"


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        h.update(path.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=TESTBED / "models" / "qwen3moe-32x64-top4")
    ap.add_argument("--calib", type=Path, default=TESTBED / "text" / "calib_mix.txt")
    ap.add_argument("--keep", type=int, default=24)
    ap.add_argument("--n", type=int, default=16, help="selection sequences")
    ap.add_argument("--repair-n", type=int, default=64, help="re-fit sequences")
    ap.add_argument("--load-delays", default="0,2", help="comma list: seconds added to each layer's load")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()

    from transformers import core_model_loading

    real_load, real_policy = core_model_loading.convert_and_load_state_dict_in_model, prune_module.refit_schedule
    layerload.ON_CPU = True
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for delay in [float(d) for d in a.load_delays.split(",")]:
            def slow(*args, delay=delay, **kw):
                time.sleep(delay)
                return real_load(*args, **kw)

            core_model_loading.convert_and_load_state_dict_in_model = slow
            row, times, digests = {"load_delay_s": delay}, {}, set()
            # both orders (A B B A): the first prune of a process pays one-time costs
            for schedule in ("each layer as chosen", "after the selection", "after the selection",
                             "each layer as chosen"):
                named = "as chosen" if schedule == "each layer as chosen" else "after"
                prune_module.refit_schedule = lambda lm, named=named: named
                out = Path(tmp) / "out"
                t0 = time.perf_counter()
                prune_checkpoint(a.model, out, keep=a.keep, calib=str(a.calib), n=a.n, repair_n=a.repair_n,
                                 progress=False, overwrite=True)
                times.setdefault(schedule, []).append(round(time.perf_counter() - t0, 2))
                digests.add(digest(out))
                prune_module.refit_schedule = real_policy
            row.update({k: v for k, v in times.items()}, same_bytes=len(digests) == 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    core_model_loading.convert_and_load_state_dict_in_model = real_load
    result = {"model": a.model.name, "keep": a.keep, "n": a.n, "repair_n": a.repair_n, "rows": rows,
              "command": "OMP_NUM_THREADS=1 python bench/layerwise_schedule.py " + " ".join(sys.argv[1:])}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
