"""The re-fit's accumulation precision against quality: ``bench/prune_quality.py`` run with the
re-fit's normal equations accumulated in float32 (``--fp32``) or with TF32 products (the
default on CUDA, ``refit.TF32_ACCUMULATION``), and with the down projections fitted jointly where
they fit (the default) or per expert everywhere (``--per-expert``: the path of large models,
whose kept experts x intermediate size exceed ``refit.JOINT_MAX_FEATURES``). On the CPU both
precisions are float32 (no TF32 there).

  python bench/refit_precision.py [--fp32] [--per-expert] -- --models qwen3moe-32x64-top4 \\
      --keeps qwen3moe-32x64-top4=16 --repairs refit --device cuda --json OUT.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prune_quality  # noqa: E402

from moecompress import refit, repair  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", action="store_true", help="accumulate in float32 (TF32 off)")
    ap.add_argument("--per-expert", action="store_true", help="fit the down projections per expert everywhere")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then bench/prune_quality.py's arguments")
    a = ap.parse_args()
    refit.TF32_ACCUMULATION = not a.fp32
    if a.per_expert:
        refit.JOINT_MAX_FEATURES = repair.JOINT_MAX_FEATURES = 0
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    print(f"accumulation: {'float32' if a.fp32 else 'TF32 on CUDA'}; down projections: "
          f"{'per expert' if a.per_expert else 'joint where they fit'}", flush=True)
    prune_quality.main(rest)


if __name__ == "__main__":
    main()
