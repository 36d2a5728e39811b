"""NAEE cases pinned in tests/data/naee_reference.json (tiny models of every family).

The reference file was written by ``python -m tests.naee_cases`` with the per-candidate NAEE
(a sub-router forward and one Gram contraction per candidate set; main at 35a134e, grouped
routing as main decides it), before the search was vectorised. tests/test_naee.py checks that
today's NAEE gives the same kept sets and evaluated-set counts, and the same scores and
relative errors to float32 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

from moecompress.prune import plan_pruning
from moecompress.testing import TINY_CONFIGS, tiny_model, tokens

REFERENCE = Path(__file__).with_name("data") / "naee_reference.json"
# (keep, options): exhaustive; beam 1 on a token subsample; beam 3 (groups of 2 at 4 kept)
CASES = {"exhaustive5": (5, {}),
         "beam1": (3, {"naee_max_combinations": 0, "naee_tokens": 10}),
         "beam3": (4, {"naee_max_combinations": 0, "naee_beam": 3})}


def run_case(family: str, case: str) -> dict:
    keep, options = CASES[case]
    plan, _ = plan_pruning(tiny_model(family), keep=keep, method="naee", tokens=tokens(2, 12), batch_size=2,
                           **options)
    return {"kept": {str(k): v for k, v in plan.kept.items()},
            "scores": {str(k): v.tolist() for k, v in plan.scores.items()},
            "relative_error": {str(k): v["relative_error"] for k, v in plan.info["layers"].items()},
            "evaluated_sets": {str(k): v["evaluated_sets"] for k, v in plan.info["layers"].items()}}


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    out = {f"{f}/{c}": run_case(f, c) for f in sorted(TINY_CONFIGS) for c in CASES}
    REFERENCE.write_text(json.dumps(out, indent=1) + "\n")
