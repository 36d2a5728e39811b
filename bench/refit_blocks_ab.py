"""The per-expert re-fit's blocks of experts (``refit.expert_feature_blocks``) against their
settings: ``bench/repair_layers.py`` (the first 4 layers of a published shape, random weights,
256 x 512 random tokens, pruned to half and re-fitted) with ``refit.BLOCK_PADDING``,
``BLOCK_ROW_MULTIPLE`` and ``BLOCK_WORK_ELEMENTS`` set. Elements 1 puts one expert in each block,
the launches of the loop the blocks replaced.

  python bench/refit_blocks_ab.py TAG PADDING MULTIPLE ELEMENTS SHAPE BATCH OUT.json
  python bench/refit_blocks_ab.py adopted 2.0 256 33554432 qwen3-30b-a3b 16 out.json
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
sys.path.insert(0, str(here.parent))

import moecompress.refit as refit  # noqa: E402


def main() -> None:
    if len(sys.argv) != 8:
        sys.exit(__doc__)
    tag, padding, multiple, elements, shape, batch, out = sys.argv[1:]
    refit.BLOCK_PADDING, refit.BLOCK_ROW_MULTIPLE, refit.BLOCK_WORK_ELEMENTS = float(padding), int(multiple), int(elements)
    print(f"== {tag} {shape}: padding {padding}, widths to {multiple}, {elements} elements", flush=True)
    sys.argv = ["repair_layers.py", "--shape", shape, "--layers", "4", "--batch-size", batch, "--json", out]
    runpy.run_path(str(here / "repair_layers.py"), run_name="__main__")


if __name__ == "__main__":
    main()
