"""Would one layer-wise pass lose quality? NAEE on the re-fitted model's inputs, on the testbed.

Issue 17's remaining distance (docs/benchmarks.md, "Session 10") points at one layer-wise pass that
selects, builds and re-fits each layer while it is onloaded, instead of NAEE over the whole model
and then the re-fit over the whole model. In that pass layer l's NAEE sees the hidden states of
the *pruned and re-fitted* layers before it, where the default's NAEE sees those of the pruned
layers only (Lu et al.'s layer-wise sequential pruning, without a repair). This script measures
what that changes, before any of it is built into the library:

* ``default``: what ``moecompress prune`` computes (``plan_experts`` naee, then
  ``prune_and_repair`` refit, target both): ``bench/prune_quality.py``'s own path;
* ``fused``: per layer, NAEE (the library's ``LayerCache`` and ``_choose``, the same options, seed
  and token subsample) observes the original block on the re-fit cursor's inputs of the selection
  sequences (the repair's first ``n`` sequences are the selection's), then the layer is pruned
  to its kept set and re-fitted exactly as ``repair`` does (same observers, target and ridge).

The repair's sequences are reordered so that the selection's come first (the selection's batches
are then the first batches of the re-fit's cursor); both variants re-fit on that order, which
changes only the order of the re-fit's sums against ``moecompress prune``.

Both are saved in bf16, reloaded and measured as ``bench/prune_quality.py`` does. A prototype of
the schedule for measuring quality, not the library's code: it reaches into private helpers.

  python bench/fused_selection.py --models qwen3moe-32x64-top4:16 mixtral-8x256-top2:4 --seeds 0 1 2 --json OUT.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import operator
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune_quality import EVAL_FILES, TESTBED, evaluate, prune_eval  # noqa: E402

from moecompress.arch import MoELayer, moe_view  # noqa: E402
from moecompress.capture import LayerCursor, _end_batch, _observing, _to, moved  # noqa: E402
from moecompress.checkpoint import load_model, save_model  # noqa: E402
from moecompress.evaluate.perplexity import load_text_tokens  # noqa: E402
from moecompress.prune.api import plan_experts  # noqa: E402
from moecompress.prune.naee import DEFAULTS, LayerCache, _choose, cached_tokens  # noqa: E402
from moecompress.refit import JOINT_MAX_FEATURES, JointRefitObserver, RefitObserver  # noqa: E402
from moecompress.repair import (DEFAULT_TARGET, EXPERT_RIDGE, JOINT_RIDGE, REPAIR_TARGETS, OriginalStream,  # noqa: E402
                                selection_and_repair_tokens)
from moecompress.stats.api import default_batch_size  # noqa: E402


@torch.no_grad()
def fused_prune(model, keep: int, sel_tokens: torch.Tensor, rep_tokens: torch.Tensor, batch_size: int,
                seed: int) -> dict[int, list[int]]:
    """Per layer: NAEE on the re-fitted model's inputs, then the re-fit of that layer (see above)."""
    view = moe_view(model)
    decoder_layers = operator.attrgetter(view.spec.layers_path)(model)
    originals = {layer.layer_idx: layer.block for layer in view}
    n_sel = sel_tokens.shape[0]
    assert torch.equal(rep_tokens[:n_sel], sel_tokens) and n_sel % batch_size == 0, "selection batches must align"
    sel_batches = n_sel // batch_size
    E = view.layers[0].num_experts
    per_batch = max(1, math.ceil(cached_tokens(E, DEFAULTS["naee_tokens"]) / sel_batches))
    cursor = LayerCursor(model, rep_tokens, batch_size=batch_size, view=view)
    last = view.layers[-1].layer_idx
    stream = OriginalStream(model, view, originals, rep_tokens, batch_size=batch_size, until=last)
    kept = {}
    for layer in list(view):
        li = layer.layer_idx
        assert cursor.position == li, "dense layers between MoE layers are not handled by this prototype"
        targets = {li: stream.after(li)}
        cache = LayerCache(layer, per_batch, seed=seed * 1_000_003 + li)  # naee_select's seed per layer
        with _observing(moe_view(model), [cache]):
            for b in range(sel_batches):
                a, kw = _to(cursor.args[li][b], cursor.device, {})
                decoder_layers[li](moved(cursor.hidden[b], cursor.device), *a, **kw)
                _end_batch([cache])
        kept[li], _, _ = _choose(layer, cache.errors(), keep, set(), dict(DEFAULTS))
        pruned = copy.deepcopy(originals[li])
        new = MoELayer(model, view.spec, li, pruned)
        new.keep_experts(kept[li])
        setattr(decoder_layers[li], view.spec.moe_block, pruned)
        cursor.view = moe_view(model)  # the cursor's hooks go on the pruned block's router
        cursor.moe = {m.layer_idx: m for m in cursor.view}
        joint = new.num_experts * new.intermediate_size <= JOINT_MAX_FEATURES
        down = (JointRefitObserver if joint else RefitObserver)({li: originals[li]}, targets,
                                                                REPAIR_TARGETS[DEFAULT_TARGET])
        with cursor.editing(li, [down]):
            down.apply(new, JOINT_RIDGE if joint else EXPERT_RIDGE)
    moe_view(model)._set_config_num_experts(keep, grouped=False)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["qwen3moe-32x64-top4:16", "mixtral-8x256-top2:4"],
                    help="MODEL:KEPT")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--testbed", type=Path, default=TESTBED)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=20_000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    for spec in a.models:
        name, keep = spec.split(":")
        keep = int(keep)
        src = a.testbed / "models" / name
        tok = AutoTokenizer.from_pretrained(src)
        ids = {f.split("_")[1].split(".")[0]: load_text_tokens(tok, a.testbed / "text" / f, a.eval_tokens)
               for f in EVAL_FILES}
        for seed in a.seeds:
            torch.manual_seed(0)
            model = load_model(src, dtype="float32")
            sel, rep = selection_and_repair_tokens(tok, str(a.testbed / "text" / "calib_mix.txt"), n=a.n, seq_len=512,
                                                   seed=seed)
            # the repair's draw holds the selection's sequences, not first: put them first (in their
            # order) so that the first batches are the selection's; both variants re-fit on this order
            rest = [r for r in rep if not any(torch.equal(r, x) for x in sel)]
            rep = torch.cat([sel, torch.stack(rest)]) if rest else sel
            bs = default_batch_size(512, a.n, on_gpu=False)
            t = time.perf_counter()
            kept = plan_experts(model, keep=keep, method="naee", tokens=sel, seed=seed, batch_size=bs).kept
            select_s = time.perf_counter() - t
            default = prune_eval(model, kept, "refit", rep, bs, src, ids, "cpu", seed)
            rows.append({"model": name, "keep": keep, "seed": seed, "variant": "default", "kept": kept,
                         "select_s": round(select_s, 2), **default})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "kept"}), flush=True)
            fused_model = copy.deepcopy(model)
            t = time.perf_counter()
            fused_kept = fused_prune(fused_model, keep, sel, rep, bs, seed)
            fused_s = time.perf_counter() - t
            with tempfile.TemporaryDirectory() as tmp:
                fused_model.to(torch.bfloat16)
                save_model(fused_model, Path(tmp) / "m", source=src)
                ppl = evaluate(Path(tmp) / "m", ids, "cpu")
            changed = {li: len(set(kept[li]) ^ set(fused_kept[li])) // 2 for li in kept}
            rows.append({"model": name, "keep": keep, "seed": seed, "variant": "fused", "kept": fused_kept,
                         "experts_changed_per_layer": changed, "seconds": round(fused_s, 2), "ppl": ppl})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "kept"}), flush=True)
            if a.json:
                a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
